"""fastdiff.diffusers.DDPMScheduler / DDIMScheduler against diffusers' own schedulers (installed
diffusers is the reference): the same config, inputs and generator give the same add_noise,
get_velocity and step outputs (prev_sample and pred_original_sample) over full sampling loops,
in float64 to ~1e-12 (both run on float64 alphas_cumprod) and in float32 by the eager error rule;
the same gradients; the same return types; configs the fused ops do not cover fall back to
diffusers' code exactly; bad input raises what diffusers raises; config round trips, pickling,
pipelines, and importing without diffusers."""
import copy
import math
import pickle
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (the reference for these tests)")

import fastdiff  # noqa: E402
import fastdiff.diffusers as fdd  # noqa: E402
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput  # noqa: E402
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput  # noqa: E402
from utils import assert_close, assert_within_eager_error  # noqa: E402

SHAPE = (2, 4, 8, 8)  # batch 2, 4 channels (SD latent channels), small spatial
BASES = {"ddpm": (fdd.DDPMScheduler, DDPMScheduler), "ddim": (fdd.DDIMScheduler, DDIMScheduler)}
F64 = 1e-12  # float64: both compute from the same float64 alphas_cumprod
# float32: within 2x diffusers' own float32 error against float64 diffusers, plus a floor
# (diffusers computes 1 - alpha_bar_t / alpha_bar_prev in float32; fastdiff in float64).
F32_FLOOR = 1e-5
F32_ATOL, F32_RTOL = 1e-4, 1e-4  # and close to diffusers' float32 numbers themselves


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _pair(kind, dtype=torch.float32, **config):
    """(fastdiff's, diffusers') scheduler with one config; for float64, both on float64
    alphas_cumprod (diffusers' step then runs in float64 throughout)."""
    ours, theirs = (cls(**config) for cls in BASES[kind])
    if dtype == torch.float64:
        for s in (ours, theirs):
            s.alphas_cumprod = s.alphas_cumprod.double()
            if kind == "ddpm":
                s.one = s.one.double()
            else:
                s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    return ours, theirs


def _model(x, t, channels_out):
    """A smooth stand-in for a denoiser: depends on the sample and the timestep."""
    out = torch.tanh(0.8 * x + 0.3 * math.sin(0.01 * t))
    if channels_out != x.shape[1]:  # learned_range: mean | variance channels in [-1, 1]
        out = torch.cat([out, torch.tanh(0.5 * x - 0.2)], dim=1)
    return out


class _Spy:
    """Counts the calls the schedulers make to fastdiff's fused ops (proves the fused path ran)."""

    def __init__(self, monkeypatch):
        self.calls = {"ddpm_step": 0, "ddim_step": 0, "q_sample": 0}
        for name in self.calls:
            fn = getattr(fdd, name)
            monkeypatch.setattr(fdd, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper


@pytest.fixture
def spy(monkeypatch):
    return _Spy(monkeypatch)


def _lockstep(runs, x, seed, channels_out, steps=10, **step_kwargs):
    """One sampling loop of ``steps`` steps (set_timesteps) on the first scheduler's trajectory:
    at each timestep every scheduler in ``runs`` ((scheduler, dtype, draw_float32) triples) steps
    the same sample, with the same model output and the same random draws (the same seed, or the
    global RNG restored). draw_float32: a float64 reference drawing the float32 run's noise.
    Returns per run [(prev_sample, pred_original_sample)] per step."""
    for sched, _, _ in runs:
        sched.set_timesteps(steps)
    timesteps = runs[0][0].timesteps
    assert all(torch.equal(sched.timesteps, timesteps) for sched, _, _ in runs)
    gens = [None if seed is None else torch.Generator().manual_seed(seed) for _ in runs]
    torch.manual_seed(1234)
    outs = [[] for _ in runs]
    for t in timesteps:
        state = torch.get_rng_state()
        for (sched, dtype, draw_float32), gen, res in zip(runs, gens, outs):
            torch.set_rng_state(state)
            xs = x.to(dtype)
            out = sched.step(_model(xs, int(t), channels_out), t, xs,
                             generator=_DrawsIn(gen, torch.float32) if draw_float32 else gen, **step_kwargs)
            res.append((out.prev_sample, out.pred_original_sample))
        x = outs[0][-1][0]
    return outs


def _check_loop(kind, config, dtype, seed, channels_out, spy, **step_kwargs):
    ours, theirs = _pair(kind, dtype, **config)
    x = _randn(*SHAPE, seed=5, dtype=dtype)
    what = f"{kind} {config} {step_kwargs} seed={seed}"
    if dtype == torch.float64:
        got, want = _lockstep([(ours, dtype, False), (theirs, dtype, False)], x, seed, channels_out, **step_kwargs)
        for i, ((p, x0), (q, y0)) in enumerate(zip(got, want)):
            assert_close(p, q, F64, F64, f"{what} step {i} prev_sample")
            assert_close(x0, y0, F64, F64, f"{what} step {i} pred_original_sample")
    else:
        exact = _pair(kind, torch.float64, **config)[1]
        got, want, truth = _lockstep([(ours, dtype, False), (theirs, dtype, False), (exact, torch.float64, True)], x,
                                     seed, channels_out, **step_kwargs)
        for i, ((p, x0), (q, y0), (r, z0)) in enumerate(zip(got, want, truth)):
            assert_close(p, q, F32_ATOL, F32_RTOL, f"{what} step {i} prev_sample vs diffusers")
            assert_close(x0, y0, F32_ATOL, F32_RTOL, f"{what} step {i} pred_original_sample vs diffusers")
            assert_within_eager_error(p, q, r, f"{what} step {i} prev_sample", floor=F32_FLOOR)
            assert_within_eager_error(x0, y0, z0, f"{what} step {i} pred_original_sample", floor=F32_FLOOR)
    assert spy.calls[f"{kind}_step"] == len(got)


class _DrawsIn:
    """Not a torch.Generator: tells the randn_tensor patch below to draw the numbers in ``dtype``
    from the generator it wraps (or the global RNG), as a run in that dtype draws them, and to
    return them in the dtype asked for (a float64 reference with a lower-precision run's noise)."""

    def __init__(self, generator, dtype):
        self.generator, self.dtype = generator, dtype


@pytest.fixture(autouse=True)
def _float32_draws_in_reference(monkeypatch):
    """Lets a float64 diffusers step use a lower-precision run's noise (see _DrawsIn)."""
    import diffusers.schedulers.scheduling_ddim as ddim_module
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    for module in (ddpm_module, ddim_module):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None, _original=module.randn_tensor):
            if isinstance(generator, _DrawsIn):
                return _original(shape, generator=generator.generator, device=device, dtype=generator.dtype,
                                 layout=layout).to(dtype)
            return _original(shape, generator=generator, device=device, dtype=dtype, layout=layout)

        monkeypatch.setattr(module, "randn_tensor", randn_tensor)


# ---------------------------------------------------------------------------------------------
# add_noise / get_velocity


TIMESTEPS = {
    "int64 per sample": lambda: torch.tensor([3, 999]),
    "int32 per sample": lambda: torch.tensor([0, 421], dtype=torch.int32),
    "0-d": lambda: torch.tensor(500),
    "one for the batch (1,)": lambda: torch.tensor([250]),
    "(B, 1)": lambda: torch.tensor([[10], [20]]),
}


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_add_noise_and_velocity(spy, kind, dtype, timesteps):
    ours, theirs = _pair(kind, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = _randn(*SHAPE, seed=0, dtype=dtype), _randn(*SHAPE, seed=1, dtype=dtype)
    t = TIMESTEPS[timesteps]()
    tol = F64 if dtype == torch.float64 else 1e-6  # float32: coefficients rounded once vs in float32 math
    got = ours.add_noise(x0, noise, t)
    assert got.dtype == dtype
    assert_close(got, theirs.add_noise(x0, noise, t), tol, tol, "add_noise")
    assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), tol, tol, "get_velocity")
    assert spy.calls["q_sample"] == 2
    assert ours.alphas_cumprod.device == x0.device  # diffusers' side effect, kept


@pytest.mark.parametrize("method", ["add_noise", "get_velocity"])
def test_add_noise_gradients(method):
    ours, theirs = _pair("ddpm", torch.float64)
    t = torch.tensor([7, 640])
    grads = []
    for s in (ours, theirs):
        a, b = _randn(*SHAPE, seed=2).requires_grad_(True), _randn(*SHAPE, seed=3).requires_grad_(True)
        out = getattr(s, method)(a, b, t)
        grads.append(torch.autograd.grad(out, (a, b), _randn(*SHAPE, seed=4)))
    for g_ours, g_theirs, name in zip(*grads, ("d first arg", "d noise")):
        assert_close(g_ours, g_theirs, F64, F64, f"{method} {name}")


# ---------------------------------------------------------------------------------------------
# DDPM step


# The global RNG (no generator) in float64 only: drawing does not depend on the step's dtype.
@pytest.mark.parametrize("dtype, seed", [(torch.float64, 7), (torch.float64, None), (torch.float32, 7)],
                         ids=["float64-generator", "float64-global_rng", "float32-generator"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddpm_loop_matches_diffusers(spy, dtype, seed, prediction_type, variance_type, clip_sample):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample)
    c_out = 2 * SHAPE[1] if variance_type == "learned_range" else SHAPE[1]
    _check_loop("ddpm", config, dtype, seed, c_out, spy)


def test_ddpm_strided_custom_timesteps(spy):
    """Custom timesteps: the previous timestep is the next entry, as diffusers' previous_timestep."""
    ours, theirs = _pair("ddpm", torch.float64)
    x = _randn(*SHAPE, seed=6)
    for s in (ours, theirs):
        s.set_timesteps(timesteps=[900, 555, 100, 3, 0])
    outs = []
    for s in (ours, theirs):
        g, sample, res = torch.Generator().manual_seed(0), x, []
        for t in s.timesteps:
            sample = s.step(_model(sample, int(t), 4), t, sample, generator=g).prev_sample
            res.append(sample)
        outs.append(res)
    for i, (a, b) in enumerate(zip(*outs)):
        assert_close(a, b, F64, F64, f"custom timesteps step {i}")
    assert spy.calls["ddpm_step"] == 5


def test_ddpm_timestep_types(spy):
    """A Python int, a NumPy int and a 0-d tensor give the same step (full schedule: t - 1)."""
    import numpy as np

    ours, theirs = _pair("ddpm", torch.float64)
    x, m = _randn(*SHAPE, seed=8), _randn(*SHAPE, seed=9)
    for t in (417, np.int64(417), torch.tensor(417), torch.tensor(417, dtype=torch.int32), 0, 1):
        got = ours.step(m, t, x, generator=torch.Generator().manual_seed(1))
        want = theirs.step(m, t, x, generator=torch.Generator().manual_seed(1))
        assert_close(got.prev_sample, want.prev_sample, F64, F64, f"t={t!r}")
        assert_close(got.pred_original_sample, want.pred_original_sample, F64, F64, f"x0 t={t!r}")
    assert spy.calls["ddpm_step"] == 6


# ---------------------------------------------------------------------------------------------
# DDIM step


DDIM_MODES = [  # (prediction_type, clip_sample, use_clipped_model_output)
    ("epsilon", True, False),
    ("v_prediction", False, False),
    ("sample", True, True),
]
SPACINGS = [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]  # (timestep_spacing, steps_offset)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing, steps_offset", SPACINGS)
@pytest.mark.parametrize("prediction_type, clip_sample, use_clipped", DDIM_MODES)
def test_ddim_loop_matches_diffusers(spy, dtype, eta, set_alpha_to_one, spacing, steps_offset, prediction_type,
                                     clip_sample, use_clipped):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=set_alpha_to_one,
                  steps_offset=steps_offset, timestep_spacing=spacing, prediction_type=prediction_type,
                  clip_sample=clip_sample)
    _check_loop("ddim", config, dtype, 11, SHAPE[1], spy, eta=eta, use_clipped_model_output=use_clipped)


def test_ddim_variance_noise_and_global_rng(spy):
    ours, theirs = _pair("ddim", torch.float64)
    for s in (ours, theirs):
        s.set_timesteps(20)
    x, m, vn = _randn(*SHAPE, seed=12), _randn(*SHAPE, seed=13), _randn(*SHAPE, seed=14)
    got = ours.step(m, 450, x, eta=0.8, variance_noise=vn)
    want = theirs.step(m, 450, x, eta=0.8, variance_noise=vn)
    assert_close(got.prev_sample, want.prev_sample, F64, F64, "variance_noise")
    torch.manual_seed(3)
    got = ours.step(m, 450, x, eta=1.0)
    torch.manual_seed(3)
    want = theirs.step(m, 450, x, eta=1.0)
    assert_close(got.prev_sample, want.prev_sample, F64, F64, "global RNG")
    assert spy.calls["ddim_step"] == 2


def test_generator_list(spy):
    """A list of generators (one per sample) draws as diffusers' randn_tensor draws it."""
    for kind in BASES:
        ours, theirs = _pair(kind, torch.float64)
        for s in (ours, theirs):
            s.set_timesteps(10)
        x, m = _randn(*SHAPE, seed=15), _randn(*SHAPE, seed=16)
        kw = {"eta": 1.0} if kind == "ddim" else {}
        outs = [s.step(m, 500, x, generator=[torch.Generator().manual_seed(i) for i in (4, 5)], **kw).prev_sample
                for s in (ours, theirs)]
        assert_close(outs[0], outs[1], F64, F64, f"{kind} generator list")
    assert spy.calls["ddpm_step"] == 1 and spy.calls["ddim_step"] == 1


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(spy, kind, dtype):
    """fp16/bf16 in, same dtype out; against diffusers in float64 (the same draws, upcast), the
    error is within 2x diffusers' own error in that dtype (fastdiff's math runs in float32)."""
    config = {"variance_type": "learned_range"} if kind == "ddpm" else {}
    ours, theirs = _pair(kind, dtype, **config)
    exact = _pair(kind, torch.float64, **config)[1]
    c_out = 2 * SHAPE[1] if kind == "ddpm" else SHAPE[1]
    kw = {"eta": 0.5} if kind == "ddim" else {}
    for s in (ours, theirs, exact):
        s.set_timesteps(10)
    x = _randn(*SHAPE, seed=40, dtype=dtype)
    m = _model(x.double(), 600, c_out)
    outs = []
    for s, mm, xx in ((ours, m.to(dtype), x), (theirs, m.to(dtype), x), (exact, m.to(dtype).double(), x.double())):
        g = torch.Generator().manual_seed(0)
        outs.append(s.step(mm, 600, xx, generator=_DrawsIn(g, dtype) if s is exact else g, **kw))
    assert outs[0].prev_sample.dtype == dtype and outs[0].pred_original_sample.dtype == dtype
    assert_within_eager_error(outs[0].prev_sample, outs[1].prev_sample, outs[2].prev_sample, "prev_sample",
                              floor=1e-3)
    assert_within_eager_error(outs[0].pred_original_sample, outs[1].pred_original_sample,
                              outs[2].pred_original_sample, "pred_original_sample", floor=1e-3)
    assert spy.calls[f"{kind}_step"] == 1


def test_backend_attribute(spy):
    """fastdiff_backend reaches the ops: the eager reference backend gives the same numbers."""
    ours, theirs = _pair("ddim", torch.float64)
    ours.fastdiff_backend = "reference"
    for s in (ours, theirs):
        s.set_timesteps(10)
    x, m = _randn(*SHAPE, seed=41), _randn(*SHAPE, seed=42)
    got = ours.step(m, 501, x, eta=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    want = theirs.step(m, 501, x, eta=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    assert_close(got, want, F64, F64, "reference backend")
    assert_close(ours.add_noise(x, m, torch.tensor([1, 2])), theirs.add_noise(x, m, torch.tensor([1, 2])), F64, F64,
                 "add_noise, reference backend")
    ours.fastdiff_backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        ours.step(m, 501, x)


# ---------------------------------------------------------------------------------------------
# Return types, gradients


@pytest.mark.parametrize("kind", BASES)
def test_return_types(kind):
    ours, theirs = _pair(kind, torch.float64)
    for s in (ours, theirs):
        s.set_timesteps(10)
    x, m = _randn(*SHAPE, seed=17), _randn(*SHAPE, seed=18)
    kw = {"eta": 0.3} if kind == "ddim" else {}
    out = ours.step(m, 600, x, generator=torch.Generator().manual_seed(0), **kw)
    ref = theirs.step(m, 600, x, generator=torch.Generator().manual_seed(0), **kw)
    assert type(out) is type(ref) is (DDIMSchedulerOutput if kind == "ddim" else DDPMSchedulerOutput)
    assert list(out.keys()) == list(ref.keys()) == ["prev_sample", "pred_original_sample"]
    tup = ours.step(m, 600, x, generator=torch.Generator().manual_seed(0), return_dict=False, **kw)
    ref_tup = theirs.step(m, 600, x, generator=torch.Generator().manual_seed(0), return_dict=False, **kw)
    assert type(tup) is type(ref_tup) is tuple and len(tup) == len(ref_tup) == 2
    for a, b, c in zip(tup, ref_tup, (out.prev_sample, out.pred_original_sample)):
        assert torch.equal(a, c)  # the same call, the same numbers
        assert_close(a, b, F64, F64, "return_dict=False")
    # "sample" prediction without clipping: pred_original_sample is the model output itself, as there
    o, t = _pair(kind, torch.float64, prediction_type="sample", clip_sample=False)
    for s in (o, t):
        s.set_timesteps(10)
    assert o.step(m, 600, x).pred_original_sample is m
    assert t.step(m, 600, x).pred_original_sample is m


@pytest.mark.parametrize("kind", BASES)
def test_skip_pred_original_sample(kind):
    ours, theirs = _pair(kind, torch.float64)
    ours.return_pred_original_sample = False
    for s in (ours, theirs):
        s.set_timesteps(10)
    x, m = _randn(*SHAPE, seed=19), _randn(*SHAPE, seed=20)
    out = ours.step(m, 300, x, generator=torch.Generator().manual_seed(0))
    assert out.pred_original_sample is None
    assert_close(out.prev_sample, theirs.step(m, 300, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                 F64, F64, "prev_sample")
    assert ours.step(m, 300, x, generator=torch.Generator().manual_seed(0), return_dict=False)[1] is None


GRAD_CASES = [
    ("ddpm", dict(prediction_type="epsilon", clip_sample=True), {}),
    ("ddpm", dict(prediction_type="v_prediction", variance_type="learned_range", clip_sample=False), {}),
    ("ddim", dict(prediction_type="epsilon", clip_sample=True), dict(eta=0.5, use_clipped_model_output=True)),
    ("ddim", dict(prediction_type="sample", clip_sample=False), dict(eta=0.0)),
]


@pytest.mark.parametrize("kind, config, kw", GRAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_gradients(spy, kind, config, kw, dtype):
    """d(prev_sample, pred_original_sample) / d(model_output, sample) equal to autograd through
    diffusers' step (model outputs large enough that clipping is active in places)."""
    ours, theirs = _pair(kind, dtype, **config)
    c_out = 2 * SHAPE[1] if config.get("variance_type") == "learned_range" else SHAPE[1]
    grads = []
    for s in (ours, theirs):
        s.set_timesteps(10)
        x = _randn(*SHAPE, seed=21, dtype=dtype).requires_grad_(True)
        m = (2 * _randn(SHAPE[0], c_out, *SHAPE[2:], seed=22, dtype=dtype)).requires_grad_(True)
        out = s.step(m, 700, x, generator=torch.Generator().manual_seed(1), **kw)
        loss = ((out.prev_sample * _randn(*SHAPE, seed=23, dtype=dtype)).sum()
                + (out.pred_original_sample * _randn(*SHAPE, seed=24, dtype=dtype)).sum())
        grads.append(torch.autograd.grad(loss, (m, x)))
    tol = F64 if dtype == torch.float64 else 1e-4
    for a, b, name in zip(*grads, ("d model_output", "d sample")):
        assert_close(a, b, tol, tol, f"{kind} {config} {name}")
    assert spy.calls[f"{kind}_step"] == 1


# ---------------------------------------------------------------------------------------------
# Fallbacks: diffusers' own code, so its numbers exactly


FALLBACKS = [  # (kind, config, step kwargs, timestep, what fallback_reason mentions)
    ("ddpm", dict(thresholding=True, sample_max_value=1.5), {}, 500, "thresholding"),
    ("ddim", dict(thresholding=True, sample_max_value=1.5), dict(eta=0.5), 501, "thresholding"),
    ("ddpm", dict(variance_type="fixed_large_log"), {}, 500, "variance_type"),
    ("ddpm", dict(variance_type="learned"), {}, 500, "variance_type"),
    ("ddpm", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"), {}, 999, "NoiseSchedule"),
    ("ddim", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                  timestep_spacing="trailing"), dict(eta=0.3), 999, "NoiseSchedule"),
    ("ddim", {}, dict(eta=1.5), 501, "eta"),
    ("ddpm", {}, {}, torch.tensor([500]), "shape (1,)"),
]


@pytest.mark.parametrize("kind, config, kw, t, reason", FALLBACKS)
def test_fallback_is_diffusers_exactly(spy, kind, config, kw, t, reason):
    ours, theirs = _pair(kind, **config)
    if kind == "ddim":  # DDPM keeps the full schedule (t - 1): t need not be in set_timesteps' list
        for s in (ours, theirs):
            s.set_timesteps(10)
    x = 3 * _randn(*SHAPE, seed=25, dtype=torch.float32)  # beyond [-1, 1]: thresholding acts
    c_out = 2 * SHAPE[1] if config.get("variance_type") == "learned" else SHAPE[1]
    m = _randn(SHAPE[0], c_out, *SHAPE[2:], seed=26, dtype=torch.float32)
    why = ours.fallback_reason(m, t, x, **kw)
    assert why is not None and reason in why, why
    got = ours.step(m, t, x, generator=torch.Generator().manual_seed(2), **kw)
    want = theirs.step(m, t, x, generator=torch.Generator().manual_seed(2), **kw)
    for a, b in ((got.prev_sample, want.prev_sample), (got.pred_original_sample, want.pred_original_sample)):
        assert torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(a.nan_to_num(), b.nan_to_num()))
    assert spy.calls[f"{kind}_step"] == 0
    # the fused path is taken again once the config allows it
    fused, _ = _pair(kind)
    if kind == "ddim":
        fused.set_timesteps(10)
    assert fused.fallback_reason(m[:, :SHAPE[1]], 500, x) is None


def test_add_noise_fallbacks(spy):
    ours, theirs = _pair("ddpm")
    x0, noise = _randn(*SHAPE, seed=27, dtype=torch.float32), _randn(*SHAPE, seed=28, dtype=torch.float32)
    cases = {
        "negative timestep (diffusers wraps)": (x0, noise, torch.tensor([-1, 5])),
        "noise broadcast": (x0, noise[:1], torch.tensor([3, 5])),
        "float64 noise": (x0, noise.double(), torch.tensor([3, 5])),
    }
    for what, args in cases.items():
        assert ours.add_noise_fallback_reason(*args) is not None, what
        assert torch.equal(ours.add_noise(*args), theirs.add_noise(*args)), what
        assert torch.equal(ours.get_velocity(*args), theirs.get_velocity(*args)), what
    assert spy.calls["q_sample"] == 0


# ---------------------------------------------------------------------------------------------
# Bad input raises what diffusers raises


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the exception itself is compared
        return type(e), str(e)
    return None


BAD = {
    "ddim step before set_timesteps": ("ddim", {}, False, lambda s, m, x: s.step(m, 500, x)),
    "ddpm unknown prediction_type": ("ddpm", dict(prediction_type="eps"), True, lambda s, m, x: s.step(m, 500, x)),
    "ddpm timestep not in timesteps": ("ddpm", {}, True, lambda s, m, x: s.step(m, 555, x)),
    "ddpm timestep >= T": ("ddpm", {}, False, lambda s, m, x: s.step(m, 1000, x)),
    "ddim generator and variance_noise": ("ddim", {}, True, lambda s, m, x: s.step(
        m, 500, x, eta=0.5, generator=torch.Generator(), variance_noise=torch.zeros_like(x))),
    "ddpm 1-D sample": ("ddpm", {}, False, lambda s, m, x: s.step(m.flatten(), 500, x.flatten())),
    "ddpm shape mismatch": ("ddpm", {}, False, lambda s, m, x: s.step(m[..., :5], 500, x)),
    "add_noise int timestep": ("ddpm", {}, False, lambda s, m, x: s.add_noise(x, m, 500)),
    "add_noise timestep >= T": ("ddim", {}, False, lambda s, m, x: s.add_noise(x, m, torch.tensor([0, 1000]))),
    "add_noise float timesteps": ("ddpm", {}, False, lambda s, m, x: s.add_noise(x, m, torch.tensor([1.0, 2.0]))),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_as_diffusers(case):
    kind, config, set_steps, call = BAD[case]
    ours, theirs = _pair(kind, **config)
    if set_steps:
        for s in (ours, theirs):
            s.set_timesteps(10)
    m, x = _randn(*SHAPE, seed=29, dtype=torch.float32), _randn(*SHAPE, seed=30, dtype=torch.float32)
    want = _raised(lambda: call(theirs, m, x))
    assert want is not None, f"diffusers accepts {case}: not a bad-input case"
    assert _raised(lambda: call(ours, m, x)) == want


# ---------------------------------------------------------------------------------------------
# Config, caching, copies, pipelines, imports


def _public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("kind", BASES)
def test_from_config_round_trip(kind, tmp_path):
    ours_cls, theirs_cls = BASES[kind]
    theirs = theirs_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction", steps_offset=1, clip_sample=False)
    ours = ours_cls.from_config(theirs.config)
    assert type(ours) is ours_cls and isinstance(ours, theirs_cls)
    assert _public(ours.config) == _public(theirs.config)
    back = theirs_cls.from_config(ours.config)
    assert type(back) is theirs_cls and _public(back.config) == _public(theirs.config)
    ours.save_pretrained(tmp_path)
    loaded = ours_cls.from_pretrained(tmp_path)
    assert type(loaded) is ours_cls and _public(loaded.config) == _public(theirs.config)
    assert loaded.config["_class_name"] == theirs_cls.__name__
    assert type(theirs_cls.from_pretrained(tmp_path)) is theirs_cls  # the saved config is diffusers'
    assert torch.equal(loaded.alphas_cumprod, theirs.alphas_cumprod)


def test_schedule_cache(spy):
    ours, theirs = _pair("ddim")
    ours.set_timesteps(10)
    x, m = _randn(*SHAPE, seed=31, dtype=torch.float32), _randn(*SHAPE, seed=32, dtype=torch.float32)
    ours.step(m, 501, x)
    cache = ours._fastdiff_cache()
    ours.step(m, 401, x)
    ours.add_noise(x, m, torch.tensor([1, 2]))
    assert ours._fastdiff_cache() is cache, "rebuilt without a change"
    assert cache.on(x.device).device == x.device
    ours.alphas_cumprod = ours.alphas_cumprod.double()  # reassigned: rebuilt
    assert ours._fastdiff_cache() is not cache
    cache = ours._fastdiff_cache()
    with torch.no_grad():
        ours.alphas_cumprod.mul_(0.999)  # changed in place: rebuilt, and the step follows it
        theirs.alphas_cumprod.mul_(0.999)
    assert ours._fastdiff_cache() is not cache
    theirs.set_timesteps(10)
    assert_close(ours.step(m, 501, x).prev_sample, theirs.step(m, 501, x).prev_sample, 1e-5, 1e-5, "after mul_")


@pytest.mark.parametrize("kind", BASES)
def test_pickle_and_deepcopy(kind):
    ours, _ = _pair(kind)
    ours.set_timesteps(10)
    x, m = _randn(*SHAPE, seed=33, dtype=torch.float32), _randn(*SHAPE, seed=34, dtype=torch.float32)
    t = 500 if kind == "ddpm" else 501  # DDPM: a timestep of set_timesteps' list
    want = ours.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    for other in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(other) is type(ours)
        assert torch.equal(other.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample, want)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def test_pipelines(spy, tiny_unet):
    """DDPMPipeline / DDIMPipeline end to end with the fused schedulers. DDIMPipeline converts
    the scheduler it is given to diffusers' DDIMScheduler, so the fused one is set afterwards."""
    ddpm_ref = DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler())
    ddpm = DDPMPipeline(unet=tiny_unet, scheduler=fdd.DDPMScheduler())
    ddim_ref = DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler())
    ddim = DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler())
    ddim.scheduler = fdd.DDIMScheduler.from_config(ddim.scheduler.config)
    for pipe in (ddpm, ddpm_ref, ddim, ddim_ref):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=5, output_type="np")
    a = ddpm(generator=torch.Generator().manual_seed(0), **kw).images
    b = ddpm_ref(generator=torch.Generator().manual_seed(0), **kw).images
    c = ddim(generator=torch.Generator().manual_seed(0), eta=0.5, **kw).images
    d = ddim_ref(generator=torch.Generator().manual_seed(0), eta=0.5, **kw).images
    assert abs(a - b).max() < 1e-4 and abs(c - d).max() < 1e-4, (abs(a - b).max(), abs(c - d).max())
    assert spy.calls["ddpm_step"] == 5 and spy.calls["ddim_step"] == 5


def test_module_attributes():
    assert fdd.DDPMScheduler is fdd.DDPMScheduler and fdd.DDPMScheduler.__module__ == "fastdiff.diffusers"
    assert {"DDPMScheduler", "DDIMScheduler", "AttnProcessor"} <= set(dir(fdd))
    assert not hasattr(fdd, "EulerDiscreteScheduler")
    assert fastdiff.diffusers is fdd


def test_import_without_diffusers():
    """fastdiff.diffusers imports without diffusers; the schedulers then raise ImportError."""
    code = (
        "import sys\n"
        "sys.modules['diffusers'] = None  # as if not installed: importing it raises ImportError\n"
        "import fastdiff.diffusers as fdd\n"
        "assert fdd.AttnProcessor('cpu').backend == 'cpu'\n"
        "assert 'DDPMScheduler' in dir(fdd) and not hasattr(fdd, 'nothing_here')\n"
        "try:\n"
        "    fdd.DDPMScheduler\n"
        "except ImportError as e:\n"
        "    assert 'install diffusers' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
        "try:\n"
        "    from fastdiff.diffusers import DDIMScheduler\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
        "del sys.modules['diffusers']\n"
        "assert fdd.DDIMScheduler.__mro__[1].__name__ == '_FusedDDIM'  # diffusers now installed: built\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
