// The one place every fastdiff operator schema is declared. Kernels register
// against these names: csrc/cpu/*_kernel.cpp (built per CPU capability into
// fastdiff._C_cpu_<cap>) and csrc/cuda/*_kernel.cu (built into fastdiff._C).
// Fake kernels live in fastdiff/ops/<op>.py, and so does the autograd, but for the
// per-layer ops group_norm_silu and attention, whose autograd is C++ (csrc/autograd).
//
// Integer codes: fastdiff/schedule_math.h (PredictionType, VarianceType).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastdiff, m) {
  m.def("q_sample(Tensor x0, Tensor noise, Tensor t, Tensor table) -> Tensor");
  m.def("_q_sample_bwd(Tensor grad_out, Tensor t, Tensor table) -> (Tensor, Tensor)");
  // Returns (loss (B,), grad_model_output). With grad_scale != 0 the same pass
  // also writes grad_scale * d loss_b / d model_output (the backward then only
  // rescales it); with grad_scale == 0 the second output is empty, shape (0,).
  m.def(
      "diffusion_loss(Tensor model_output, Tensor x0, Tensor noise, Tensor t, Tensor table, "
      "int prediction_type, float snr_gamma, float grad_scale) -> (Tensor, Tensor)");
  m.def(
      "_diffusion_loss_bwd(Tensor grad_loss, Tensor model_output, Tensor x0, Tensor noise, "
      "Tensor t, Tensor table, int prediction_type, float snr_gamma) -> Tensor");
  // noise None: the step's mean (no noise term; the posterior mean at the predicted x0).
  m.def(
      "ddpm_step(Tensor model_output, Tensor sample, Tensor? noise, Tensor t, Tensor t_prev, "
      "Tensor table, int prediction_type, int variance_type, bool clip_sample, "
      "float clip_sample_range) -> Tensor");
  m.def(
      "_ddpm_step_bwd(Tensor grad_out, Tensor model_output, Tensor sample, Tensor? noise, "
      "Tensor t, Tensor t_prev, Tensor table, int prediction_type, int variance_type, "
      "bool clip_sample, float clip_sample_range) -> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor model_output, Tensor sample, Tensor? noise, Tensor t, Tensor t_prev, "
      "Tensor table, int prediction_type, float eta, bool clip_sample, float clip_sample_range, "
      "bool use_clipped_model_output) -> Tensor");
  m.def(
      "_ddim_step_bwd(Tensor grad_out, Tensor model_output, Tensor sample, Tensor t, "
      "Tensor t_prev, Tensor table, int prediction_type, float eta, bool clip_sample, "
      "float clip_sample_range, bool use_clipped_model_output) -> (Tensor, Tensor)");
  // The Gaussian family (gaussian_math.h). noise may be None: then z is not
  // computed and the first output is empty, shape (0,).
  m.def(
      "sample_and_kl(Tensor mean, Tensor logvar, Tensor? noise) -> (Tensor z, Tensor kl)");
  m.def(
      "_sample_and_kl_bwd(Tensor? grad_z, Tensor grad_kl, Tensor mean, Tensor logvar, "
      "Tensor? noise) -> (Tensor, Tensor)");
  // The diffusion VLB term per sample (vlb_math.h), in bits per dim; posterior is
  // NoiseSchedule.posterior_table(). With grad_scale != 0 the same pass also writes
  // grad_scale * d loss_b / d (model_mean, model_log_variance); else both are empty (0,).
  m.def(
      "vb_loss(Tensor model_mean, Tensor model_log_variance, Tensor x0, Tensor x_t, Tensor t, "
      "Tensor posterior, float grad_scale) -> (Tensor loss, Tensor grad_mean, Tensor grad_log_variance)");
  m.def(
      "_vb_loss_bwd(Tensor grad_loss, Tensor model_mean, Tensor model_log_variance, Tensor x0, "
      "Tensor x_t, Tensor t, Tensor posterior) -> (Tensor, Tensor)");
  // GroupNorm + SiLU (group_norm_math.h). x: (N, C, *) contiguous, or channels-last
  // dense (C innermost: channels_last / channels_last_3d); y and grad_x keep x's layout;
  // grad_y may have any strides (copied to x's layout when they differ).
  // weight / bias: (C,) in x's accumulation type (float; double for double) or None.
  // mean / rstd: (N, G) accumulation type. grad_weight / grad_bias: (C,), empty (0,)
  // when weight / bias is None. silu = false: plain GroupNorm.
  m.def(
      "group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, "
      "bool silu) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "_group_norm_silu_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor rstd, int num_groups, bool silu) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bias)");
  // Attention, non-causal, no N x N tensor (attention_math.h). q: (B, H, Nq, D),
  // k / v: (B, H, Nk, D), head dim contiguous (stride 1), other strides free.
  // out: (B, H, Nq, D) stored as (B, Nq, H, D) memory (a free view to (B, Nq, H * D)
  // for the output projection); lse: (B, H, Nq) contiguous, accumulation type,
  // lse = log sum_j exp(scale q.k_j). grad_out: any strides (copied when the head dim's is not 1).
  // grad_q / grad_k / grad_v: stored as (B, N, H, D) memory like out.
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

// Importable as a Python module so `import fastdiff._C` loads the library.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
