"""Shared test helpers: error reports, the dtype rule, backends runnable here."""
from __future__ import annotations

import torch

from fastdiff._backend import reasons_not_usable

REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def err_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual.double() - expected.double()).abs()
    finite = torch.isfinite(diff)
    return (f"max abs err {diff[finite].max().item() if finite.any() else float('nan'):.3e}, "
            f"mean {diff[finite].mean().item() if finite.any() else float('nan'):.3e}, "
            f"non-finite {int((~finite).sum())}/{diff.numel()}")


def assert_close(actual, expected, atol, rtol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ok = torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True)
    assert ok, f"{what}: {err_report(actual, expected)} (atol={atol}, rtol={rtol})"


def assert_within_eager_error(fused, eager, exact, what="", slack=2.0, floor=0.0):
    """flash-attention's rule: the fused result's error against a float64 reference is at
    most `slack` times the error of eager PyTorch run in the same (reduced) dtype."""
    assert fused.dtype == eager.dtype, f"{what}: dtype {fused.dtype} != {eager.dtype}"
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(fused), finite), f"{what}: non-finite where the reference is finite (or back)"
    fused_err = (fused.double() - exact.double())[finite].abs().max().item()
    # Eager in a reduced dtype can overflow where fastdiff (fp32 inside) does not: those
    # entries say nothing about the error scale and are left out.
    eager_ok = finite & torch.isfinite(eager)
    eager_err = (eager.double() - exact.double())[eager_ok].abs().max().item() if eager_ok.any() else 0.0
    assert fused_err <= slack * eager_err + floor, (
        f"{what}: fused error {fused_err:.3e} > {slack} x eager error {eager_err:.3e} (+{floor})")


def fused_backends_here(op: str = "q_sample", device="cpu") -> list[str]:
    """The fused backends that can run on this machine for CPU tensors (triton interpreted)."""
    dev = torch.device(device)
    return [b for b in ("cpu", "cuda", "triton") if not reasons_not_usable(b, op, dev)]

