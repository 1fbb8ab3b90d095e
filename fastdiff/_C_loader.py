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
    try:
        best = torch.backends.cpu.get_cpu_capability().lower()
    except Exception:  # pragma: no cover - very old torch
        best = "default"
    if best not in _CAP_ORDER:
        return ["default"]
    return list(_CAP_ORDER[_CAP_ORDER.index(best):])


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
