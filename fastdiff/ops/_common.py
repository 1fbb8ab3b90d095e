"""Argument checks, layout normalization and op registration shared by the ops.

Public functions validate at the boundary and raise ValueError/TypeError
naming the argument and the value; the kernels then rely on a simple layout
contract: every per-sample tensor is dense with the batch outermost and all
share the same strides (contiguous NCHW and channels_last qualify as they
are; anything else is copied to contiguous first).
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import _C_loader
from ..schedule import NoiseSchedule

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(x, name: str, *, like=None, like_name: str = "", min_dim: int = 1):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float64/float16/bfloat16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims (batch first), got shape {tuple(x.shape)}")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match {like_name} shape {tuple(like.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")
        if x.dtype != like.dtype:
            raise TypeError(f"{name} dtype {x.dtype} does not match {like_name} dtype {like.dtype}")


def check_schedule(schedule):
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastdiff.NoiseSchedule, got {type(schedule).__name__}")


def check_choice(value, name: str, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return choices.index(value)


def timesteps(t, name: str, batch: int, device: torch.device, num_timesteps: int,
              allow_negative: bool = False, kernel_checks_range: bool = False) -> torch.Tensor:
    """t as an int64 (B,) tensor on ``device``, range-checked (here, or by the CPU kernel
    itself when ``kernel_checks_range``: it raises the same ValueError without an extra pass)."""
    lo_ok = "-inf" if allow_negative else "0"
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor of shape ({batch},), got {type(t).__name__}")
    if isinstance(t, int):
        if t >= num_timesteps or (t < 0 and not allow_negative):
            raise ValueError(f"{name} = {t} is outside [{lo_ok}, {num_timesteps})")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    t = t.to(torch.int64).contiguous()
    if batch and not kernel_checks_range and not torch.compiler.is_compiling():
        lo, hi = torch.stack([t.min(), t.max()]).tolist()  # one host sync for both
        if hi >= num_timesteps or (lo < 0 and not allow_negative):
            bad = hi if hi >= num_timesteps else lo
            raise ValueError(f"{name} contains {bad}, outside [{lo_ok}, {num_timesteps})")
    return t


def randn_like_diffusers(shape, generator, device, dtype):
    """Noise drawn as diffusers' randn_tensor draws it (on the generator's device, then moved),
    so the same generator gives the same numbers as DDPMScheduler/DDIMScheduler.step."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _dense(x: torch.Tensor) -> bool:
    """No gaps and no overlaps: strides are a permutation of a contiguous tensor's."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def batch_flat(x: torch.Tensor) -> bool:
    """Dense with the batch outermost: B blocks of numel / B elements (the kernels' contract)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return True  # the common layouts, decided in C++
    b = x.shape[0]
    return _dense(x) and (b <= 1 or x.stride(0) == x.numel() // b)


def memory_order(x: torch.Tensor) -> tuple:
    """The strides that matter: those of dims of size != 1 (a size-1 dim's stride is arbitrary,
    e.g. (B, 1, H, W) contiguous and channels_last lay out the same memory)."""
    return tuple(st for size, st in zip(x.shape, x.stride()) if size != 1)


def same_layout(*tensors):
    """The tensors as they are when they already share one dense batch-outer layout,
    else contiguous copies (None entries pass through)."""
    present = [x for x in tensors if x is not None]
    order = memory_order(present[0])
    if all(batch_flat(x) and memory_order(x) == order for x in present):
        return tensors
    return tuple(None if x is None else x.contiguous() for x in tensors)


def dense(x: torch.Tensor) -> torch.Tensor:
    return x if batch_flat(x) else x.contiguous()


def match_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient in ``like``'s strides (autograd may hand us expanded/strided ones)."""
    if batch_flat(grad) and memory_order(grad) == memory_order(like):
        return grad
    return torch.empty_like(like).copy_(grad)


def _is_exactly(grad_loss, value) -> bool:
    """grad_loss == value everywhere, decided without a device sync and never while tracing
    (then False: the rescale is always correct, only sometimes unnecessary)."""
    if grad_loss.device.type != "cpu" or torch.compiler.is_compiling() or is_fake(grad_loss):
        return False
    return bool((grad_loss == value).all())


def rescale_precomputed(grads, grad_loss, grad_scale):
    """Gradients a loss's forward wrote as grad_scale * d loss_b / d input, scaled to the upstream
    per-sample grad_loss. It is usually exactly grad_scale (loss.mean().backward()): then they
    are handed out as they are. Out of place otherwise: the buffers are also the op's outputs."""
    if _is_exactly(grad_loss, grad_scale):
        return grads
    factor = grad_loss / grad_scale
    return tuple(g * factor.view((-1,) + (1,) * (g.dim() - 1)).to(g.dtype) for g in grads)


# -- registration ------------------------------------------------------------------
# The C++ ops live in torch.ops.fastdiff (CPU/CUDA kernels); the Triton launchers
# are registered as torch.ops.fastdiff_triton with the same schemas, so both get
# the same fake kernels and backward math (in Python, but for the fastdiff::
# per-layer ops, whose autograd is C++: see register) and neither breaks a
# torch.compile graph.
_triton_lib = torch.library.Library("fastdiff_triton", "DEF")
NAMESPACES = ("fastdiff", "fastdiff_triton")


def define_triton_op(name: str, launcher):
    schema = str(getattr(torch.ops.fastdiff, name).default._schema).split("::", 1)[1]
    _triton_lib.define(schema)
    for key in ("CPU", "CUDA"):
        _triton_lib.impl(name, launcher, key)


def first_order_only(name: str, backward):
    """``backward`` refusing create_graph=True: the backward ops have no autograd of their own,
    so a second derivative through them would be silently wrong (PyTorch only warns). The C++
    autograd of the per-layer ops does the same check (csrc/autograd/autograd_common.h)."""
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and (any(g is not None and g.requires_grad for g in grads) or any(
                t is not None and t.requires_grad for t in ctx.saved_tensors)):
            raise RuntimeError(f"fastdiff.{name} has no double backward: its gradient was taken with "
                               "create_graph=True and would be wrong beyond first order; use "
                               'backend="reference" for higher-order gradients (e.g. a gradient penalty)')
        return backward(ctx, *grads)

    return checked


def register(name: str, bwd_name: str, fake_fwd, fake_bwd, setup_context, make_backward, triton_fwd, triton_bwd):
    """Fake kernels + autograd for fastdiff::<name> and fastdiff_triton::<name>. The per-layer
    ops (group_norm_silu, attention) have their fastdiff:: autograd in C++ (csrc/autograd):
    those keep it, and the Python one here serves their Triton namespace only."""
    if not _C_loader.loaded_main:
        return
    define_triton_op(name, triton_fwd)
    define_triton_op(bwd_name, triton_bwd)
    for ns in NAMESPACES:
        torch.library.register_fake(f"{ns}::{name}")(fake_fwd)
        torch.library.register_fake(f"{ns}::{bwd_name}")(fake_bwd)
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", "Autograd"):
            continue
        bwd_op = getattr(getattr(torch.ops, ns), bwd_name)
        torch.library.register_autograd(f"{ns}::{name}", first_order_only(name, make_backward(bwd_op)),
                                        setup_context=setup_context)


def op_namespace(backend: str):
    return torch.ops.fastdiff_triton if backend == "triton" else torch.ops.fastdiff
