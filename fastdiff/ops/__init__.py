"""The ops: one module per op (public function, fake kernel, autograd)."""

# Every fused op, in the order reports list them (info, kernels, bench).
OPS = ("q_sample", "diffusion_loss", "ddpm_step", "ddim_step", "sample_and_kl", "vb_loss", "group_norm_silu",
       "attention")
