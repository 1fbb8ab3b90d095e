"""Benchmark case of fastdiff.vb_loss: improved DDPM's VLB term (the L_vlb of the hybrid loss),
per-sample KL to the true posterior (decoder NLL at t = 0), mean over the batch.

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_vb_loss.py --benchmark-only``.
"""
import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "vb_loss"
SCHEDULE = fastdiff.NoiseSchedule.cosine(1000)


def setup(shape, device, dtype):
    """A training batch: 8-bit data, t uniform (the first sample at t = 0, so both terms run),
    x_t from it, the model's mean near the true posterior mean, a learned-range log-variance."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, shape, generator=g) / 127.5 - 1
    t = torch.randint(0, SCHEDULE.num_timesteps, (shape[0],), generator=g)
    t[0] = 0
    x_t = reference.q_sample(x0, t, torch.randn(shape, generator=g), SCHEDULE)
    mean, _ = reference.q_posterior_mean_log_variance(x0, x_t, t, SCHEDULE)
    v = torch.rand(shape, generator=g) * 2 - 1
    inputs = {
        "model_mean": mean + 0.002 * torch.randn(shape, generator=g),
        "model_log_variance": reference.learned_range(v, t, SCHEDULE),
        "x0": x0,
        "x_t": x_t,
    }
    inputs = {k: x.to(device=device, dtype=dtype) for k, x in inputs.items()}
    return dict(inputs, t=t.to(device), schedule=SCHEDULE.to(device))


def call(fn, inp, **kw):
    return fn(inp["model_mean"], inp["model_log_variance"], inp["x0"], inp["x_t"], inp["t"], inp["schedule"],
              reduction="mean", **kw)


CASE = OpCase(
    op=OP,
    config="reduction=mean;schedule=cosine;t=uniform",
    setup=setup,
    call=call,
    reference=reference.vb_loss,
    api=fastdiff.vb_loss,
    # The hybrid loss differentiates the model's mean and log-variance; x0 and x_t are data.
    grad_inputs=("model_mean", "model_log_variance"),
    # N = numel(x0); the per-sample terms (B values) are not counted.
    moved={"fwd": 4, "bwd": 6, "full": 10},
    bytes_doc={
        "fwd": "read model_mean, model_log_variance, x0, x_t = 4N",
        "bwd": "read the 4 inputs; write grad_model_mean, grad_model_log_variance = 6N",
        "full": "fwd + bwd = 10N (fastdiff's forward writes the gradients: 6N in one pass)",
    },
    scalar_output=True,
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_vb_loss(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
