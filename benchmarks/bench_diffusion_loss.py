"""Benchmark case of fastdiff.diffusion_loss: v-prediction MSE with min-SNR-5 weights, mean over the batch.

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_diffusion_loss.py --benchmark-only``.
"""
import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "diffusion_loss"
SCHEDULE = fastdiff.NoiseSchedule.scaled_linear(1000)
PREDICTION_TYPE = "v_prediction"
SNR_GAMMA = 5.0


def setup(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "model_output": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "x0": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "noise": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "t": torch.randint(0, SCHEDULE.num_timesteps, (shape[0],), generator=g).to(device),
        "schedule": SCHEDULE.to(device),
    }


def call(fn, inp, **kw):
    return fn(inp["model_output"], inp["x0"], inp["noise"], inp["t"], inp["schedule"],
              prediction_type=PREDICTION_TYPE, snr_gamma=SNR_GAMMA, reduction="mean", **kw)


CASE = OpCase(
    op=OP,
    config=f"prediction_type={PREDICTION_TYPE};snr_gamma={SNR_GAMMA:g};reduction=mean;schedule=scaled_linear",
    setup=setup,
    call=call,
    reference=reference.diffusion_loss,
    api=fastdiff.diffusion_loss,
    # Training differentiates the model output only; x0 and noise are data.
    grad_inputs=("model_output",),
    # N = numel(model_output); the per-sample losses (B values) are not counted.
    moved={"fwd": 3, "bwd": 4, "full": 7},
    bytes_doc={
        "fwd": "read model_output, x0, noise = 3N (loss: B scalars)",
        "bwd": "read model_output, x0, noise; write grad_model_output = 4N (grad_out: a scalar)",
        "full": "fwd + bwd = 7N",
    },
    scalar_output=True,
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_diffusion_loss(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
