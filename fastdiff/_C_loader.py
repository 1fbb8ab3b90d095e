"""Loads the C++ extension without ever failing import.

fastdiff._C holds the operator schemas and the CUDA kernels; the CPU kernels
are built once per CPU capability (fastdiff._C_cpu_<cap>) and the best one the
running CPU supports is loaded (ATen's DispatchStub idea, per module).
"""
from __future__ import annotations

import importlib

import torch

# Best first. torch reports what the CPU can run (and honours ATEN_CPU_CAPABILITY).
_CAP_ORDER = ("avx512", "avx2", "default")

errors: dict[str, str] = {}
cpu_capability: str | None = None
loaded_main = False


def _supported_caps():
    """The capabilities this CPU runs, best first, among those that were built."""
    try:
        best = torch.backends.cpu.get_cpu_capability().lower()
    except Exception:  # pragma: no cover - very old torch
        best = "default"
    caps = list(_CAP_ORDER[_CAP_ORDER.index(best):]) if best in _CAP_ORDER else ["default"]
    try:
        from ._build_config import CPU_CAPS as built
    except ImportError:  # built by other means: try them all
        return caps
    return [c for c in caps if c in built]


def load():
    global cpu_capability, loaded_main
    try:
        importlib.import_module("fastdiff._C")
        loaded_main = True
    except Exception as e:  # import never fails: report why instead
        errors["_C"] = f"{type(e).__name__}: {e}"
        return
    for cap in _supported_caps():
        try:
            importlib.import_module(f"fastdiff._C_cpu_{cap}")
            cpu_capability = cap
            return
        except Exception as e:
            errors[f"_C_cpu_{cap}"] = f"{type(e).__name__}: {e}"


_kernel_cache: dict[tuple[str, str], bool] = {}


# Evaluated once at trace time under torch.compile (a constant, not a graph op).
@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    key = (op, dispatch_key)
    if key not in _kernel_cache:  # registrations do not change after load()
        try:
            found = loaded_main and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{op}", dispatch_key)
        except RuntimeError:
            found = False
        _kernel_cache[key] = found
    return _kernel_cache[key]


load()
