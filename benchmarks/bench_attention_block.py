"""Benchmark case of the U-Net attention block: one training step (forward, then the gradients
of x and of every parameter) of ``fastdiff.reference.AttentionBlock`` (eager: GroupNorm, qkv
conv, materialized softmax, output conv) against ``fastdiff.nn.AttentionBlock`` with the same
weights. Sizes are B x C x H x W; 64 channels per head (ADM).

Providers: ``reference`` (the eager block), ``compile`` (torch.compile of it), and the fused
block with fastdiff.attention's backend ``cpu`` / ``sdpa`` (``cuda`` / ``triton`` on GPUs).

Peak memory of a step, each provider in its own subprocess:
``python -m fastdiff.benchmarks.bench_attention_block --memory [--sizes 2x256x64x64] [--csv F]``
(RSS sampled every 0.2 ms during one step after a warm-up step, minus the RSS just before it;
glibc is told to map every block over 64 KB on its own so freed tensors leave the RSS).
"""
import argparse
import csv
import datetime
import json
import sys

import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, parse_size, pytest_params, pytest_run, shape_str
from fastdiff.train.measure import peak_step_memory, run_isolated

OP = "attention_block"
HEAD_CHANNELS = 64
SIZES = (
    (8, 256, 32, 32),   # N = 1024 tokens
    (2, 256, 64, 64),   # N = 4096 tokens (ADM's 64x64 level)
)
MEMORY_PROVIDERS = ("reference", "compile", "cpu", "sdpa")


def setup(shape, device, dtype):
    if len(shape) != 4:
        raise ValueError(f"attention_block sizes are B x C x H x W, got {shape}")
    channels = shape[1]
    torch.manual_seed(0)
    ref = reference.AttentionBlock(channels, num_head_channels=HEAD_CHANNELS).to(device=device, dtype=dtype)
    with torch.no_grad():  # a trained block: proj_out is not zero
        torch.nn.init.normal_(ref.proj_out.weight, std=channels ** -0.5)
    fused = fastdiff.nn.AttentionBlock(channels, num_head_channels=HEAD_CHANNELS).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    inputs = {"x": torch.randn(shape, device=device, dtype=dtype), "modules": (ref, fused)}
    inputs |= {name: p.detach() for name, p in ref.named_parameters()}
    return inputs


PARAMS = tuple(name for name, _ in reference.AttentionBlock(64, num_head_channels=HEAD_CHANNELS).named_parameters())


def block_step(module, params, x):
    """The block's output with its parameters taken from ``params`` (so that they are leaves the
    benchmark differentiates)."""
    return torch.func.functional_call(module, params, (x,))


def fused_block_step(module, params, x, backend=None):
    module.backend = backend
    return block_step(module, params, x)


def call(fn, inp, **kw):
    ref, fused = inp["modules"]
    params = {name: inp[name] for name in PARAMS}
    return fn(fused if kw else ref, params, inp["x"], **kw)


def nbytes(mode, shape, dtype):  # x in, out; grad in, grad_x out (parameters are small)
    per = {"fwd": 2, "bwd": 2, "full": 4}[mode]
    n = 1
    for s in shape:
        n *= s
    return per * n * torch.empty((), dtype=dtype).element_size()


CASE = OpCase(
    op=OP,
    config=f"num_head_channels={HEAD_CHANNELS};norm_groups=32",
    setup=setup,
    call=call,
    reference=block_step,
    api=fused_block_step,
    grad_inputs=("x",) + PARAMS,
    moved={},
    bytes_doc={"fwd": "read x; write out", "bwd": "read grad_out; write grad_x", "full": "fwd + bwd"},
    sizes=SIZES,
    bytes_fn=nbytes,
    backend_op="attention",
)


# -- peak memory ------------------------------------------------------------------------

def _measure_one(provider, shape):
    from fastdiff.benchmark import make_runner

    inputs = setup(shape, torch.device("cpu"), torch.float32)
    run = make_runner(CASE, provider, "full", inputs)
    run()  # warm-up (compiles)
    return peak_step_memory(run)


def measure_memory(sizes, providers, out_csv=None):
    """Runs each (size, provider) in a fresh subprocess; prints a table, optionally writes CSV rows."""
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for shape in sizes:
        peaks = {}
        for p in providers:
            peaks[p] = run_isolated("fastdiff.benchmarks.bench_attention_block",
                                    ["--measure-one", p, shape_str(shape)])["peak_bytes"]
        ref = peaks.get("reference")
        for p, b in peaks.items():
            ratio = b / ref if ref else float("nan")
            print(f"{OP} {shape_str(shape):>16s} full {p:9s} peak step memory {b / 2**20:9.1f} MB"
                  f"   {ratio:6.3f} x reference", flush=True)
            rows.append({"op": OP, "provider": p, "mode": "full", "metric": "peak_rss_growth", "unit": "MB",
                         "x_name": "shape", "x_value": shape_str(shape), "p50": round(b / 2**20, 2), "p20": "",
                         "p80": "", "config": CASE.config, "device": "cpu", "torch": torch.__version__,
                         "triton": "", "timestamp": stamp})
    if out_csv:
        with open(out_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastdiff.benchmarks.bench_attention_block")
    ap.add_argument("--memory", action="store_true", help="peak step memory per provider (subprocesses)")
    ap.add_argument("--sizes", default=",".join(shape_str(s) for s in SIZES))
    ap.add_argument("--providers", default=",".join(MEMORY_PROVIDERS))
    ap.add_argument("--csv", default=None)
    ap.add_argument("--measure-one", nargs=2, metavar=("PROVIDER", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_one:
        provider, size = args.measure_one
        print(json.dumps({"peak_bytes": _measure_one(provider, parse_size(size))}))
        return 0
    if not args.memory:
        ap.error("nothing to do: pass --memory (timings: fastdiff bench --ops attention_block)")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    measure_memory(sizes, args.providers.split(","), args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_attention_block(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
