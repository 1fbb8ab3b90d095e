"""fastdiff inside diffusers: the attention processor ``fastdiff.diffusers.AttnProcessor``
and the fused schedulers ``fastdiff.diffusers.DDPMScheduler`` / ``DDIMScheduler``.

    import fastdiff.diffusers
    unet.set_attn_processor(fastdiff.diffusers.AttnProcessor())          # every Attention module
    vae.set_attn_processor(fastdiff.diffusers.AttnProcessor("cpu"))     # one backend for all calls
    fastdiff.diffusers.set_attn_processor(model, fastdiff.diffusers.AttnProcessor())
        # any nn.Module, including models without set_attn_processor (UNet2DModel)

The schedulers subclass diffusers' DDPMScheduler / DDIMScheduler (same config, same
``from_pretrained`` / ``from_config``, same outputs); ``add_noise``, ``step`` and
``get_velocity`` run fastdiff's fused ops:

    scheduler = fastdiff.diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    scheduler = fastdiff.diffusers.DDIMScheduler.from_pretrained(repo, subfolder="scheduler")

This submodule is imported explicitly (``import fastdiff`` does not import it) and imports
without diffusers installed: ``AttnProcessor`` only reads the ``Attention`` module it is
handed, and the scheduler classes (which subclass diffusers' and so need it at class-definition
time) are built on first access through the module's ``__getattr__`` (PEP 562). Its name
shadows nothing: imports are absolute, so ``import diffusers`` anywhere (here included) is the
real package.
"""
from __future__ import annotations

import logging
import numbers
import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ._backend import _check_name
from .ops._common import FLOAT_DTYPES
from .ops.attention import attention
from .ops.ddim_step import ddim_step
from .ops.ddpm_step import ddpm_step
from .ops.q_sample import q_sample
from .reference import PREDICTION_TYPES
from .schedule import NoiseSchedule

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

__all__ = ["AttnProcessor", "set_attn_processor"]


class AttnProcessor:
    r"""diffusers attention processor running ``fastdiff.attention`` (no (Nq, Nk) score
    tensor; deterministic backward), a drop-in for diffusers' ``AttnProcessor2_0``:

        unet.set_attn_processor(fastdiff.diffusers.AttnProcessor(backend=None))

    Everything around the attention product is done as ``AttnProcessor2_0`` does it, in the
    same order and with the module's own layers: ``spatial_norm`` (with ``temb``), 4-D
    (B, C, H, W) inputs flattened to (B, H*W, C) tokens, ``group_norm``, ``to_q`` / ``to_k`` /
    ``to_v``, ``norm_cross`` on the encoder hidden states (cross-attention only), ``norm_q`` /
    ``norm_k`` per head, ``to_out`` (linear, then dropout), the reshape back to 4-D,
    ``residual_connection`` and ``rescale_output_factor``.

    backend: passed to ``fastdiff.attention`` on every call ("cpu", "cuda", "triton", "sdpa",
    "xformers", "reference", or None / "auto": ``fastdiff.use_backend`` / FASTDIFF_BACKEND /
    the fastest usable one). Checked here, when the processor is built.

    Where it differs from ``AttnProcessor2_0``:

    - ``attention_mask``: fastdiff's kernels take no mask. A call given a mask (including the
      UNet's ``encoder_attention_mask``, which diffusers passes on as a mask) is computed by
      ``torch.nn.functional.scaled_dot_product_attention`` with the mask prepared exactly as
      ``AttnProcessor2_0`` prepares it (``attn.prepare_attention_mask``, viewed as
      (B, heads, Nq or 1, Nk)); ``backend`` does not apply to that call. Calls without a mask
      in the same model still run fastdiff.
    - Softmax scale: ``attn.scale`` (what diffusers' ``AttnProcessor`` uses). With diffusers'
      defaults (``scale_qk=True``) this is 1/sqrt(head dim), the scale ``AttnProcessor2_0``
      uses, so outputs match; modules built with ``scale_qk=False`` (scale 1), for which
      diffusers itself picks ``AttnProcessor`` over ``AttnProcessor2_0``, get their scale
      instead of having it ignored.
    - Modules ``AttnProcessor2_0`` computes silently wrong raise ``ValueError``
      instead: added key/value projections (``added_kv_proj_dim``: use diffusers'
      ``AttnAddedKVProcessor2_0``) and causal attention (``is_causal=True``).
    - Head dims above 256 raise ``ValueError`` from ``fastdiff.attention`` (no silent fallback).

    Extra keyword arguments (diffusers' ``cross_attention_kwargs``) are accepted and ignored
    as ``AttnProcessor2_0`` ignores them, with the same deprecation warning for ``scale``.
    The processor holds no parameters or buffers: nothing enters a state_dict, and loading
    one leaves the processors as set. diffusers' ``set_default_attn_processor`` refuses
    processors it does not know; ``set_attn_processor(AttnProcessor2_0())`` switches back.
    """

    def __init__(self, backend: str | None = None):
        if backend is not None:
            _check_name(backend)
        self.backend = backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            _deprecate_scale()
        if getattr(attn, "add_k_proj", None) is not None:
            raise ValueError(
                "fastdiff.diffusers.AttnProcessor does not run Attention modules with added key/value projections "
                f"(added_kv_proj_dim={getattr(attn, 'added_kv_proj_dim', None)}); set diffusers' "
                "AttnAddedKVProcessor2_0 on those modules (set_attn_processor with a dict)")
        if getattr(attn, "is_causal", False):
            raise ValueError("fastdiff.diffusers.AttnProcessor runs non-causal attention only, but this "
                             "Attention module has is_causal=True")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, H*W, C) tokens
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape

        if attention_mask is not None:
            # As AttnProcessor2_0: (B * heads, Nq or 1, Nk) -> (B, heads, Nq or 1, Nk) for SDPA.
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:  # over channels: (B, N, C) -> (B, C, N) and back
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states  # after group_norm, as AttnProcessor2_0
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, N, heads * D) -> (B, heads, N, D): views with stride 1 along D, the kernels' contract.
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # None: each kernel's own 1/sqrt(D), bitwise what AttnProcessor2_0 computes.
        scale = None if attn.scale == head_dim ** -0.5 else attn.scale
        if attention_mask is None:
            out = attention(query, key, value, scale, backend=self.backend)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False, scale=scale)
        # fastdiff's (B, heads, Nq, D) is stored as (B, Nq, heads, D): this reshape is a view.
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def set_attn_processor(model: torch.nn.Module, processor) -> int:
    """Set ``processor`` on every submodule of ``model`` (itself included) that has
    ``set_processor`` (diffusers' ``Attention`` modules), as diffusers' ``set_attn_processor``
    does, for any ``nn.Module``: ``UNet2DModel`` has no ``set_attn_processor`` of its own.
    Returns how many modules were set (0 raises: nothing would run fastdiff)."""
    count = 0
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no attention module with set_processor (diffusers' Attention)")
    return count


def _deprecate_scale() -> None:
    """The warning AttnProcessor2_0 gives for a ``scale`` argument, through diffusers' own
    ``deprecate`` (which turns it into an error from diffusers 1.0.0 on)."""
    message = ("The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise "
               "an error in the future. `scale` should directly be passed while calling the underlying pipeline "
               "component i.e., via `cross_attention_kwargs`.")
    try:
        from diffusers.utils import deprecate
    except ImportError:  # called outside diffusers: a plain warning
        import warnings

        warnings.warn(message, FutureWarning, stacklevel=3)
        return
    deprecate("scale", "1.0.0", message)


# ---------------------------------------------------------------------------------------------
# Schedulers: fastdiff.diffusers.DDPMScheduler / DDIMScheduler.
#
# The classes subclass diffusers' and so are built on first access (module __getattr__ below);
# everything they add lives in the mixins here, which need no diffusers. Each call first makes a
# plan: either everything the fused op needs, or a string saying why the call goes to diffusers'
# own method instead (``fallback_reason`` returns it). The fallback is the parent's method called
# with the same arguments, so its outputs, random draws and errors are diffusers' own.

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
_logger = logging.getLogger(__name__)
# Integer dtypes diffusers indexes alphas_cumprod with by value (uint8 and bool index as masks).
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
# DDPM variance types where diffusers 0.42 and fastdiff.ddpm_step agree. fixed_large_log and
# learned: diffusers takes the square root of a log-variance (NaN); fastdiff follows improved
# DDPM there, so a drop-in for diffusers runs diffusers' own code.
_DDPM_FUSED_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")


class _ScheduleCache:
    """The fastdiff.NoiseSchedule of one scheduler, built once from its ``betas`` and
    ``alphas_cumprod`` (as NoiseSchedule.from_diffusers takes them) and rebuilt when either is
    reassigned or changed in place (it holds them and their version counters); its copies per
    device; alpha_bar as Python floats (pred_original_sample's coefficients)."""

    __slots__ = ("alphas_cumprod", "ac_version", "betas", "betas_version", "schedule", "error", "alpha_bar",
                 "by_device")

    def __init__(self, scheduler):
        self.alphas_cumprod, self.betas = scheduler.alphas_cumprod, scheduler.betas
        self.ac_version = getattr(self.alphas_cumprod, "_version", None)
        self.betas_version = getattr(self.betas, "_version", None)
        self.schedule = self.error = self.alpha_bar = None
        self.by_device = {}
        try:
            self.schedule = NoiseSchedule.from_diffusers(scheduler)
        except (TypeError, ValueError) as e:
            self.error = f"fastdiff.NoiseSchedule does not take this scheduler's schedule ({e})"
            return
        self.alpha_bar = self.schedule.alphas_cumprod.tolist()
        self.by_device[torch.device("cpu")] = self.schedule

    def valid_for(self, scheduler) -> bool:
        ac, betas = scheduler.alphas_cumprod, scheduler.betas
        return (ac is self.alphas_cumprod and getattr(ac, "_version", None) == self.ac_version
                and betas is self.betas and getattr(betas, "_version", None) == self.betas_version)

    def on(self, device: torch.device) -> NoiseSchedule:
        schedule = self.by_device.get(device)
        if schedule is None:
            schedule = self.by_device[device] = self.schedule.to(device)
        return schedule


class _StepPlan:
    """What a fused step needs: int timesteps, the schedule on the sample's device, alpha_bar_t
    (float64), the clip range (None: no clipping), eta (DDIM)."""

    __slots__ = ("t", "t_prev", "schedule", "alpha_bar", "clip_range", "eta")

    def __init__(self, t, t_prev, schedule, alpha_bar, clip_range, eta=0.0):
        self.t, self.t_prev, self.schedule, self.alpha_bar = t, t_prev, schedule, alpha_bar
        self.clip_range, self.eta = clip_range, eta


def _check_pair(a, b, a_name: str, b_name: str) -> str | None:
    """Why the fused ops cannot take a and b as diffusers would (None: they can)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return f"{a_name} and {b_name} are not both tensors"
    if a.dtype not in FLOAT_DTYPES:
        return f"{a_name} has dtype {a.dtype} (fastdiff runs float32/float64/float16/bfloat16)"
    if b.dtype != a.dtype or b.device != a.device:
        return (f"{b_name} ({b.dtype}, {b.device}) and {a_name} ({a.dtype}, {a.device}) differ in dtype or device "
                "(diffusers promotes or raises)")
    if a.dim() < 1:
        return f"{a_name} is 0-d (fastdiff's ops take a batch dimension)"
    return None


def _scalar_timestep(timestep, num_timesteps: int):
    """(t, None) for a timestep diffusers' step indexes as one integer (a Python/NumPy int or a
    0-d int8/16/32/64 tensor on any device) in [0, T); else (None, why)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.dim() != 0:
            return None, f"timestep is a tensor of shape {tuple(timestep.shape)}, not an int or a 0-d tensor"
        if timestep.dtype not in _INDEX_DTYPES:
            return None, f"timestep has dtype {timestep.dtype}, not an integer dtype diffusers indexes by value"
        t = int(timestep)
    elif isinstance(timestep, numbers.Integral) and not isinstance(timestep, bool):
        t = int(timestep)
    else:
        return None, f"timestep {timestep!r} is not an integer"
    if not 0 <= t < num_timesteps:  # diffusers raises, or wraps a negative index
        return None, f"timestep {t} is outside [0, {num_timesteps})"
    return t, None


def _clip_range(config):
    """(range or None, why or None) for clip_sample / clip_sample_range."""
    if not config.clip_sample:
        return None, None
    r = config.clip_sample_range
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r < float("inf"):
        return None, f"clip_sample_range={r!r} is not a finite positive number"
    return float(r), None


def _pred_original_sample(model_output, sample, alpha_bar: float, prediction_type: str, clip_range):
    """diffusers' "predicted x_0" (clipped when clip_range is set), computed eagerly: the fused
    steps return only prev_sample. Two elementwise passes (a third to clip); the coefficients
    sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) in float64 (diffusers: float32 tensors)."""
    sa, s1 = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        x0 = torch.sub(sample, model_output, alpha=s1).div_(sa)
    elif prediction_type == "sample":
        x0 = model_output  # as diffusers: the model output itself
    else:  # v_prediction
        x0 = torch.mul(sample, sa).sub_(model_output, alpha=s1)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    return x0


class _FusedSchedulerMixin:
    """add_noise / get_velocity through fastdiff.q_sample, the schedule cache and the options
    shared by both schedulers."""

    #: backend for every fastdiff op the scheduler calls (None: auto / fastdiff.use_backend).
    fastdiff_backend: str | None = None
    #: step's pred_original_sample is computed eagerly (the fused kernels return only
    #: prev_sample). Set False to skip those extra passes when only prev_sample is used (diffusers'
    #: DDPM/DDIM pipelines): pred_original_sample is then None.
    return_pred_original_sample: bool = True

    def _fastdiff_cache(self) -> _ScheduleCache:
        cache = self.__dict__.get("_fastdiff_schedule_cache")
        if cache is None or not cache.valid_for(self):
            cache = _ScheduleCache(self)
            self.__dict__["_fastdiff_schedule_cache"] = cache
        return cache

    def _plan_timestep(self, timestep):
        """(clip_range, schedule cache, t) that both steps need, or why the step cannot be fused (str)."""
        clip_range, why = _clip_range(self.config)
        if why:
            return why
        cache = self._fastdiff_cache()
        if cache.error:
            return cache.error
        t, why = _scalar_timestep(timestep, len(cache.alpha_bar))
        return why or (clip_range, cache, t)

    def _plan_noise(self, x, noise, timesteps, x_name: str, noise_name: str):
        """(t, schedule) for fastdiff.q_sample as diffusers' add_noise reads x, noise, timesteps;
        or why not (str)."""
        why = _check_pair(x, noise, x_name, noise_name)
        if why:
            return why
        if noise.shape != x.shape:
            return f"{noise_name} shape {tuple(noise.shape)} != {x_name} shape {tuple(x.shape)} (diffusers broadcasts)"
        if not isinstance(timesteps, torch.Tensor):
            return f"timesteps is a {type(timesteps).__name__}, not a tensor (diffusers raises)"
        if timesteps.dtype not in _INDEX_DTYPES:
            return f"timesteps has dtype {timesteps.dtype}, not an integer dtype diffusers indexes by value"
        n, batch = timesteps.numel(), x.shape[0]
        if n == 0 or n not in (1, batch):
            return f"{n} timesteps for a batch of {batch} (fastdiff takes 1 or one per sample)"
        cache = self._fastdiff_cache()
        if cache.error:
            return cache.error
        t = timesteps.to(x.device).reshape(-1)
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host sync for both
        if lo < 0 or hi >= len(cache.alpha_bar):  # diffusers raises, or wraps a negative index
            return f"timesteps reach {lo if lo < 0 else hi}, outside [0, {len(cache.alpha_bar)})"
        return (t.reshape(()) if n == 1 else t), cache.on(x.device)

    def add_noise_fallback_reason(self, original_samples, noise, timesteps) -> str | None:
        """None when ``add_noise`` with these arguments runs fastdiff.q_sample, else why it
        runs diffusers' own add_noise."""
        plan = self._plan_noise(original_samples, noise, timesteps, "original_samples", "noise")
        return plan if isinstance(plan, str) else None

    def _fused_or_diffusers(self, method: str, x, noise, timesteps, x_name: str, fused):
        """diffusers' ``method``(x, noise, timesteps) as ``fused(t, schedule)``, or diffusers' own
        method when the arguments need it (the plan says why)."""
        if isinstance(x, torch.Tensor):  # diffusers' side effect, kept
            self.alphas_cumprod = self.alphas_cumprod.to(device=x.device)
        plan = self._plan_noise(x, noise, timesteps, x_name, "noise")
        if isinstance(plan, str):
            _log_fallback(self, method, plan)
            return getattr(super(), method)(x, noise, timesteps)
        return fused(*plan)

    def add_noise(self, original_samples, noise, timesteps):
        """diffusers' add_noise (sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise) in one fused
        pass (fastdiff.q_sample), differentiable in original_samples and noise."""
        return self._fused_or_diffusers(
            "add_noise", original_samples, noise, timesteps, "original_samples",
            lambda t, schedule: q_sample(original_samples, t, noise, schedule, backend=self.fastdiff_backend))

    def get_velocity(self, sample, noise, timesteps):
        """diffusers' get_velocity, sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) sample, as
        fastdiff.q_sample(noise, t, -sample): one negation and one fused pass."""
        return self._fused_or_diffusers(
            "get_velocity", sample, noise, timesteps, "sample",
            lambda t, schedule: q_sample(noise, t, torch.neg(sample), schedule, backend=self.fastdiff_backend))

    def _output(self, prev_sample, pred_original_sample, return_dict):
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return self._output_class(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _common_step_checks(self, model_output, sample):
        why = _check_pair(sample, model_output, "sample", "model_output")
        if why:
            return why
        if self.config.thresholding:
            return "thresholding=True (dynamic thresholding takes a per-sample quantile; the fused steps clip only)"
        if self.config.prediction_type not in PREDICTION_TYPES:
            return (f"prediction_type={self.config.prediction_type!r} is not one of {PREDICTION_TYPES} "
                    "(diffusers raises)")
        return None


class _FusedDDPM(_FusedSchedulerMixin):
    """diffusers' ``DDPMScheduler`` whose ``add_noise``, ``step`` and ``get_velocity`` run
    fastdiff's fused ops (``q_sample``, ``ddpm_step``). Same constructor and config
    (``from_pretrained``, ``from_config``, ``save_pretrained``, ``set_timesteps`` are diffusers'
    own), same outputs (``DDPMSchedulerOutput`` or, with ``return_dict=False``, the tuple
    ``(prev_sample, pred_original_sample)``), and the same random draws: the variance noise is
    drawn by diffusers' ``randn_tensor`` with the arguments ``DDPMScheduler.step`` passes it, so
    a generator (or a list of them) gives the numbers diffusers gives. The step is
    differentiable in model_output and sample; ``pred_original_sample`` is computed eagerly
    (see ``return_pred_original_sample``). The previous timestep is diffusers' own
    ``previous_timestep`` (t - 1, or the next entry of ``timesteps`` after ``set_timesteps``).

    A call runs diffusers' own method, unchanged (outputs, draws and errors exactly
    diffusers'), where the fused op would not give diffusers' result; ``fallback_reason(...)``
    / ``add_noise_fallback_reason(...)`` say which path a call takes:

    - ``thresholding=True`` (dynamic thresholding: a per-sample quantile of x_0);
    - ``variance_type`` ``"fixed_large_log"`` or ``"learned"``: diffusers 0.42 returns NaN there
      (the square root of a log-variance), fastdiff.ddpm_step follows improved DDPM; likewise any
      variance type fastdiff does not know;
    - a model_output not of sample's shape (or (B, 2C, ...) for ``"learned_range"``), inputs
      that are not float tensors of one dtype and device or have fewer than 2 dims, an unknown
      prediction_type (diffusers broadcasts or raises);
    - a timestep that is not a Python/NumPy int or a 0-d integer tensor in [0, T) (a 1-element
      1-D tensor, a negative index, which diffusers wraps), a previous timestep >= T;
    - ``clip_sample`` with a clip_sample_range that is not a finite positive number;
    - a schedule fastdiff.NoiseSchedule does not take: alpha_bar reaching 0
      (``rescale_betas_zero_snr=True``) or betas outside (0, 1];
    - ``add_noise`` / ``get_velocity``: timesteps that are not an int8/16/32/64 tensor (a Python
      int: diffusers raises), not 1 or one per sample, outside [0, T); noise of another shape,
      dtype or device.
    """

    def fallback_reason(self, model_output, timestep, sample, generator=None) -> str | None:
        """None when ``step`` with these arguments runs fastdiff.ddpm_step, else why it runs
        diffusers' own step."""
        plan = self._plan_step(model_output, timestep, sample)
        return plan if isinstance(plan, str) else None

    def _plan_step(self, model_output, timestep, sample):
        why = self._common_step_checks(model_output, sample)
        if why:
            return why
        if sample.dim() < 2 or model_output.dim() < 2:
            return "sample or model_output has fewer than 2 dims (diffusers' step reads shape[1])"
        variance_type = self.variance_type
        if variance_type not in _DDPM_FUSED_VARIANCE_TYPES:
            return (f"variance_type={variance_type!r}: fused for {_DDPM_FUSED_VARIANCE_TYPES} only (diffusers 0.42 "
                    "returns NaN for fixed_large_log and learned, fastdiff follows improved DDPM there)")
        expected = tuple(sample.shape)
        if variance_type == "learned_range":
            expected = (sample.shape[0], 2 * sample.shape[1]) + expected[2:]
        if tuple(model_output.shape) != expected:
            return f"model_output shape {tuple(model_output.shape)} != {expected} for variance_type={variance_type!r}"
        common = self._plan_timestep(timestep)
        if isinstance(common, str):
            return common
        clip_range, cache, t = common
        num_timesteps = len(cache.alpha_bar)
        t_prev = int(self.previous_timestep(timestep))  # diffusers' own (raises as step does)
        if t_prev >= num_timesteps:
            return f"previous timestep {t_prev} is outside [0, {num_timesteps})"
        if t_prev < 0 and float(self.one) != 1.0:
            return f"scheduler.one = {float(self.one)} (fastdiff takes alpha_bar = 1 before t = 0)"
        return _StepPlan(t, max(t_prev, -1), cache.on(sample.device), cache.alpha_bar[t], clip_range)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """diffusers' ``DDPMScheduler.step`` through fastdiff.ddpm_step (see the class)."""
        plan = self._plan_step(model_output, timestep, sample)
        if isinstance(plan, str):
            _log_fallback(self, "step", plan)
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        config = self.config
        # The mean channels, as diffusers' torch.split gives them (learned_range: first C of 2C).
        mean_output = model_output[:, :sample.shape[1]] if model_output.shape[1] != sample.shape[1] else model_output
        noise = None
        if plan.t > 0:  # diffusers draws only then: the generator advances as there
            noise = self._diffusers_module.randn_tensor(mean_output.shape, generator=generator,
                                                        device=mean_output.device, dtype=mean_output.dtype)
        prev_sample = ddpm_step(model_output, plan.t, sample, plan.schedule, noise=noise,
                                prediction_type=config.prediction_type, variance_type=self.variance_type,
                                clip_sample=plan.clip_range is not None,
                                clip_sample_range=1.0 if plan.clip_range is None else plan.clip_range,
                                t_prev=plan.t_prev, backend=self.fastdiff_backend)
        x0 = None
        if self.return_pred_original_sample:
            x0 = _pred_original_sample(mean_output, sample, plan.alpha_bar, config.prediction_type, plan.clip_range)
        return self._output(prev_sample, x0, return_dict)


class _FusedDDIM(_FusedSchedulerMixin):
    """diffusers' ``DDIMScheduler`` whose ``add_noise``, ``step`` and ``get_velocity`` run
    fastdiff's fused ops (``q_sample``, ``ddim_step``). Same constructor and config, same outputs
    (``DDIMSchedulerOutput`` or the tuple ``(prev_sample, pred_original_sample)``), same random
    draws (diffusers' ``randn_tensor`` with step's arguments, only when eta > 0; or
    ``variance_noise``). The previous timestep is diffusers':
    ``timestep - num_train_timesteps // num_inference_steps`` (any ``timestep_spacing``), and
    before t = 0 alpha_bar is ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else
    alpha_bar_0). Differentiable in model_output and sample; ``pred_original_sample`` is
    computed eagerly (see ``return_pred_original_sample``). diffusers' ``DDIMPipeline`` turns the
    scheduler it is built with into diffusers' own DDIMScheduler; set this one afterwards:
    ``pipe.scheduler = fastdiff.diffusers.DDIMScheduler.from_config(pipe.scheduler.config)``.

    A call runs diffusers' own method, unchanged, where the fused op would not give diffusers'
    result (``fallback_reason(...)`` says which path a call takes):

    - ``set_timesteps`` not called yet (diffusers raises);
    - ``thresholding=True``; an unknown prediction_type;
    - eta not a real number in [0, 1] (above 1, diffusers' sqrt(1 - alpha_bar_prev - sigma^2)
      can be NaN where fastdiff clamps at 0);
    - ``variance_noise`` together with a generator (diffusers raises), or one that is not a
      tensor of sample's shape, dtype and device, or that requires grad (fastdiff's noise is a
      constant);
    - model_output not of sample's shape, dtype and device; a timestep that is not a Python/NumPy
      int or a 0-d integer tensor in [0, T); ``final_alpha_cumprod`` neither 1 nor alpha_bar_0;
    - ``clip_sample`` with a clip_sample_range that is not a finite positive number;
    - a schedule fastdiff.NoiseSchedule does not take (``rescale_betas_zero_snr=True``: alpha_bar
      reaches 0);
    - ``add_noise`` / ``get_velocity``: as for ``fastdiff.diffusers.DDPMScheduler``.
    """

    def fallback_reason(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False,
                        generator=None, variance_noise=None) -> str | None:
        """None when ``step`` with these arguments runs fastdiff.ddim_step, else why it runs
        diffusers' own step."""
        plan = self._plan_step(model_output, timestep, sample, eta, generator, variance_noise)
        return plan if isinstance(plan, str) else None

    def _plan_step(self, model_output, timestep, sample, eta, generator, variance_noise):
        steps = self.num_inference_steps
        if steps is None:
            return "set_timesteps has not been called (diffusers raises)"
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps <= 0:
            return f"num_inference_steps={steps!r} is not a positive int"
        why = self._common_step_checks(model_output, sample)
        if why:
            return why
        if model_output.shape != sample.shape:
            return f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}"
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
            return f"eta={eta!r} is not a real number in [0, 1]"
        eta = float(eta)
        if eta > 0 and variance_noise is not None:
            if generator is not None:
                return "both generator and variance_noise given (diffusers raises)"
            why = _check_pair(sample, variance_noise, "sample", "variance_noise")
            if why:
                return why
            if variance_noise.shape != sample.shape:
                return f"variance_noise shape {tuple(variance_noise.shape)} != sample shape {tuple(sample.shape)}"
            if variance_noise.requires_grad and torch.is_grad_enabled():
                return "variance_noise requires grad (fastdiff.ddim_step treats noise as a constant)"
        common = self._plan_timestep(timestep)
        if isinstance(common, str):
            return common
        clip_range, cache, t = common
        t_prev = t - self.config.num_train_timesteps // int(steps)  # as diffusers computes it
        if t_prev < 0:
            final = float(self.final_alpha_cumprod)
            if final == 1.0:
                t_prev = -1  # fastdiff: t_prev < 0 means alpha_bar_prev = 1
            elif final == cache.alpha_bar[0]:
                t_prev = 0  # set_alpha_to_one=False: alpha_bar_0
            else:
                return f"final_alpha_cumprod = {final} is neither 1 nor alphas_cumprod[0]"
        return _StepPlan(t, t_prev, cache.on(sample.device), cache.alpha_bar[t], clip_range, eta)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """diffusers' ``DDIMScheduler.step`` through fastdiff.ddim_step (see the class)."""
        plan = self._plan_step(model_output, timestep, sample, eta, generator, variance_noise)
        if isinstance(plan, str):
            _log_fallback(self, "step", plan)
            return super().step(model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        config = self.config
        noise = None
        if plan.eta > 0:  # diffusers draws only then
            noise = variance_noise
            if noise is None:
                noise = self._diffusers_module.randn_tensor(model_output.shape, generator=generator,
                                                            device=model_output.device, dtype=model_output.dtype)
        prev_sample = ddim_step(model_output, plan.t, plan.t_prev, sample, plan.schedule, eta=plan.eta, noise=noise,
                                prediction_type=config.prediction_type, clip_sample=plan.clip_range is not None,
                                clip_sample_range=1.0 if plan.clip_range is None else plan.clip_range,
                                use_clipped_model_output=bool(use_clipped_model_output),
                                backend=self.fastdiff_backend)
        x0 = None
        if self.return_pred_original_sample:
            x0 = _pred_original_sample(model_output, sample, plan.alpha_bar, config.prediction_type, plan.clip_range)
        return self._output(prev_sample, x0, return_dict)


def _log_fallback(scheduler, method: str, why: str) -> None:
    if _logger.isEnabledFor(logging.DEBUG):
        _logger.debug("%s.%s runs diffusers' own code: %s", type(scheduler).__name__, method, why)


_scheduler_classes: dict = {}
_scheduler_lock = threading.Lock()


def _build_schedulers() -> dict:
    """Define the scheduler classes (once): diffusers is needed from here on."""
    with _scheduler_lock:
        if _scheduler_classes:
            return _scheduler_classes
        try:
            import diffusers.schedulers.scheduling_ddim as ddim_module
            import diffusers.schedulers.scheduling_ddpm as ddpm_module
        except ImportError as e:
            raise ImportError("fastdiff.diffusers.DDPMScheduler and DDIMScheduler subclass diffusers' schedulers: "
                              "install diffusers (pip install diffusers)") from e

        class DDPMScheduler(_FusedDDPM, ddpm_module.DDPMScheduler):
            __qualname__ = "DDPMScheduler"  # pickle finds it as fastdiff.diffusers.DDPMScheduler
            __doc__ = _FusedDDPM.__doc__
            _diffusers_module = ddpm_module  # randn_tensor: the function diffusers' step calls
            _output_class = ddpm_module.DDPMSchedulerOutput

        class DDIMScheduler(_FusedDDIM, ddim_module.DDIMScheduler):
            __qualname__ = "DDIMScheduler"
            __doc__ = _FusedDDIM.__doc__
            _diffusers_module = ddim_module
            _output_class = ddim_module.DDIMSchedulerOutput

        _scheduler_classes.update(DDPMScheduler=DDPMScheduler, DDIMScheduler=DDIMScheduler)
        globals().update(_scheduler_classes)  # later lookups skip __getattr__
    return _scheduler_classes


def __getattr__(name: str):
    """PEP 562: the scheduler classes are built on first access (they need diffusers)."""
    if name in SCHEDULERS:
        return _build_schedulers()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SCHEDULERS))
