"""Benchmark case of fastdiff.ddim_step: epsilon prediction, eta=0.5, noise given, t_prev = t - 20
(per-sample t), no clipping.

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_ddim_step.py --benchmark-only``.
"""
import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "ddim_step"
SCHEDULE = fastdiff.NoiseSchedule.scaled_linear(1000)
ETA = 0.5
STRIDE = 20  # 50 inference steps over 1000 training steps


def setup(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(STRIDE, SCHEDULE.num_timesteps, (shape[0],), generator=g)
    return {
        "model_output": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "sample": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "noise": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "t": t.to(device),
        "t_prev": (t - STRIDE).to(device),
        "schedule": SCHEDULE.to(device),
    }


def call(fn, inp, **kw):
    return fn(inp["model_output"], inp["t"], inp["t_prev"], inp["sample"], inp["schedule"], eta=ETA,
              noise=inp["noise"], prediction_type="epsilon", **kw)


CASE = OpCase(
    op=OP,
    config=f"prediction_type=epsilon;eta={ETA:g};noise=given;t_prev=t-{STRIDE};clip_sample=False;"
           "schedule=scaled_linear",
    setup=setup,
    call=call,
    reference=reference.ddim_step,
    api=fastdiff.ddim_step,
    grad_inputs=("model_output", "sample"),
    # N = numel(sample). Without clipping the step is linear in model_output and sample with
    # per-sample coefficients, so the backward needs only grad_out.
    moved={"fwd": 4, "bwd": 3, "full": 7},
    bytes_doc={
        "fwd": "read model_output, sample, noise; write prev_sample = 4N",
        "bwd": "read grad_out; write grad_model_output, grad_sample = 3N (linear step, no clip)",
        "full": "fwd + bwd = 7N",
    },
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_ddim_step(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
