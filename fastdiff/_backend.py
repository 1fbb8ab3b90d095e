"""Backend registry and dispatch.

A backend is chosen per call by ``backend=``, else by ``fastdiff.use_backend``,
else by the FASTDIFF_BACKEND environment variable, else "auto". Auto walks a
priority list per device and skips what cannot run; an explicit choice that
cannot run raises with the reasons of every backend (xformers'
not_supported_reasons idea).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import torch

from . import _C_loader

BACKENDS = ("reference", "cpu", "cuda", "triton", "sdpa", "xformers")
# Backends that run one op only: other libraries' kernels for it.
OP_ONLY = {"sdpa": "attention", "xformers": "attention"}
# Auto priority per device type. On CUDA the C++ kernels come first: for these
# memory-bound elementwise ops both fused backends move the same bytes.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Per-op overrides. attention on CPU: fastdiff's kernel measured faster than SDPA
# (benchmarks/results/cpu_attention.txt). On CUDA SDPA (FlashAttention-2 on tensor
# cores) first: fastdiff's CUDA/Triton attention kernels have not been timed on a GPU.
OP_AUTO_ORDER = {"attention": {"cuda": ("sdpa", "triton", "cuda", "reference"),
                               "cpu": ("cpu", "sdpa", "reference")}}

_current = contextvars.ContextVar("fastdiff_backend", default=None)


class BackendError(RuntimeError):
    """No backend can run the requested op."""


def _check_name(name):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """``with fastdiff.use_backend("triton"): ...`` selects the backend of every op inside."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


# FASTDIFF_BACKEND is read on every call (tests and users set it at run time), from
# os.environ's own dict where it has one: os.environ.get goes through three Python
# frames, a few microseconds per op call inside a training step.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FASTDIFF_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend():
    if _ENV_DATA is None or _ENV_KEY is None:
        return os.environ.get("FASTDIFF_BACKEND")
    value = _ENV_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def requested_backend(backend=None) -> tuple[str, str]:
    """(name, where it came from)."""
    if backend is not None:
        return _check_name(backend), "backend= argument"
    ctx = _current.get()
    if ctx is not None:
        return ctx, "fastdiff.use_backend"
    env = _env_backend()
    if env:
        try:
            return _check_name(env), "FASTDIFF_BACKEND"
        except ValueError as e:
            raise ValueError(f"FASTDIFF_BACKEND: {e}") from None
    return "auto", "default"


@torch.compiler.assume_constant_result
def triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, ""


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def reasons_not_usable(name: str, op: str, device: torch.device) -> list[str]:
    """Why ``name`` cannot run ``op`` on ``device`` (empty list: it can)."""
    why = []
    if name in OP_ONLY and op != OP_ONLY[name]:
        return [f"{name} runs only fastdiff.{OP_ONLY[name]}"]
    if name in ("reference", "sdpa"):
        return why
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            why.append("xformers is not installed (pip install xformers)")
        elif device.type != "cuda":
            why.append(f"tensors are on {device}, xformers' memory_efficient_attention needs CUDA tensors")
        return why
    if name in ("cpu", "cuda"):
        if not _C_loader.loaded_main:
            why.append(f"fastdiff._C failed to load ({_C_loader.errors.get('_C', 'not built')})")
            return why
        if name == "cpu":
            if device.type != "cpu":
                why.append(f"tensors are on {device}, the cpu backend needs CPU tensors")
            elif not _C_loader.has_kernel(op, "CPU"):
                why.append("no CPU kernel loaded (" + "; ".join(
                    f"{k}: {v}" for k, v in _C_loader.errors.items()) + ")")
        else:
            if device.type != "cuda":
                why.append(f"tensors are on {device}, the cuda backend needs CUDA tensors")
            elif not _C_loader.has_kernel(op, "CUDA"):
                why.append("fastdiff._C was built without CUDA kernels (see fastdiff.info())")
        return why
    if name == "triton":
        ok, msg = triton_available()
        if not ok:
            why.append(msg)
        elif device.type == "cpu" and not interpret_mode():
            why.append("triton runs CPU tensors only under TRITON_INTERPRET=1")
        elif device.type not in ("cpu", "cuda"):
            why.append(f"triton does not run on {device.type} tensors")
        return why
    raise ValueError(f"unknown backend {name!r}")


# select()'s answers by (op, device, backend=, use_backend, FASTDIFF_BACKEND). They depend
# on nothing else that can change after import (what loaded, what is installed), except
# triton on CPU tensors (TRITON_INTERPRET): those are never kept. Errors are not kept.
_selected: dict = {}


def select(op: str, device: torch.device, backend=None) -> str:
    """The backend that runs ``op`` on ``device``: the requested one if it can, else the first
    usable one of the auto order; raises BackendError when a requested one cannot."""
    if torch.compiler.is_compiling() or not (backend is None or type(backend) is str):
        return _select(op, device, backend)  # traced as before; a bad backend= raises there
    key = (op, device, backend, _current.get(), _env_backend())
    name = _selected.get(key)
    if name is None:
        name = _select(op, device, backend)
        if not (name == "triton" and device.type == "cpu"):
            _selected[key] = name
    return name


def _select(op: str, device: torch.device, backend=None) -> str:
    name, source = requested_backend(backend)
    if name != "auto":
        why = reasons_not_usable(name, op, device)
        if why:
            lines = [f"backend {name!r} (from {source}) cannot run fastdiff.{op} on {device}:"]
            for b in BACKENDS:
                if b in OP_ONLY and OP_ONLY[b] != op and b != name:
                    continue
                r = reasons_not_usable(b, op, device)
                lines.append(f"  {b}: {'usable' if not r else '; '.join(r)}")
            raise BackendError("\n".join(lines))
        return name
    order = OP_AUTO_ORDER.get(op, AUTO_ORDER).get(device.type, ("reference",))
    for b in order:
        if not reasons_not_usable(b, op, device):
            return b
    return "reference"
