"""Benchmark of whole training steps: forward, loss, backward and an AdamW step of fastdiff's
reference models (``fastdiff.models.UNet`` / ``VAE``) and of a diffusers ``UNet2DModel``.

Providers per row:

- ``reference``: the eager model (``fused=False``; for diffusers: the model as diffusers builds it);
- ``fused``: the same weights on fastdiff's fused ops (``fused=True``; diffusers: ``fastdiff.patch``);
- ``compile``: ``torch.compile`` of the eager model (UNets: the whole module; VAE: encoder and
  decoder, the posterior's sample and KL stay eager). Skipped, with the reason, when it fails.

Every provider starts from the same weights (one seeded eager model's state_dict) and steps on
one fixed batch; the loss's random draws (t and noise, the posterior's noise) are re-seeded each
step so every step does the same work. The UNet loss is ``GaussianDiffusion.training_loss``
(the fused q_sample and MSE for every provider: only the model differs); the VAE loss is
``VAE.loss`` (its fused / eager posterior sample and KL belong to the model).

    python -m fastdiff.benchmarks.bench_training [--rows unet-tiny,vae-tiny] [--reps 7]
        [--memory] [--profile] [--csv F]

prints per row and provider: median step time (p20-p80), images/s and the ratio of medians to
``reference`` (providers interleaved in one process, ``fastdiff.train.measure``); with
``--memory`` the peak RSS growth of one step, each provider in its own subprocess; with
``--profile`` the share of self CPU time (torch.profiler, one step) held by the ops fastdiff
fuses: in the eager models the GroupNorm, SiLU, softmax / attention and batched-matmul aten ops
(``EAGER_FUSED_AWAY``; the eager VAE posterior's elementwise ops are not counted), in the
fused models the model's fastdiff ops.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import fastdiff
from fastdiff.benchmark import CSV_COLUMNS, device_name, shape_str
from fastdiff.models import UNet, VAE
from fastdiff.train.measure import allocator_setting, interleaved_step_times, peak_step_memory, run_isolated

PROVIDERS = ("reference", "fused", "compile")
MODULE = "fastdiff.benchmarks.bench_training"
LR = 1e-4
VAE_BETA = 1e-6
DATA_SEED, INIT_SEED, LOSS_SEED = 1234, 0, 0

# aten ops of the eager models that fastdiff's fused ops replace (GroupNorm + SiLU, attention
# scores / softmax / weighted sum), forward and backward; self CPU time is summed over them.
EAGER_FUSED_AWAY = (
    "aten::native_group_norm", "aten::native_group_norm_backward", "aten::silu", "aten::silu_backward",
    "aten::_softmax", "aten::_softmax_backward_data", "aten::bmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)

# fastdiff ops of GaussianDiffusion.training_loss, run by every provider: not the model's
DIFFUSION_LOSS_OPS = ("q_sample", "diffusion_loss")


@dataclass(frozen=True)
class Row:
    """One benchmarked training setup: a model ``kind`` ("unet", "vae", "diffusers") of a named
    ``config`` on (batch, 3, image_size, image_size) images; ``channels_last``: weights and
    batch in NHWC memory format (as ``fastdiff train --channels-last``)."""

    name: str
    kind: str
    config: str
    batch: int
    image_size: int
    channels_last: bool = False

    @property
    def shape(self):
        return (self.batch, 3, self.image_size, self.image_size)


_CONTIGUOUS_ROWS = (
    Row("unet-tiny", "unet", "tiny", 16, 32),
    Row("unet-small", "unet", "small", 8, 64),
    Row("vae-tiny", "vae", "tiny", 8, 32),
    Row("vae-small", "vae", "small", 4, 64),
    Row("diffusers-unet", "diffusers", "ddpm-half", 16, 32),
)
DEFAULT_ROWS = tuple(r.name for r in _CONTIGUOUS_ROWS)
# the same setups in channels_last (not run by default): --rows unet-small-nhwc,...
ROWS = {r.name: r for r in (*_CONTIGUOUS_ROWS, *(dataclasses.replace(r, name=f"{r.name}-nhwc", channels_last=True)
                                                  for r in _CONTIGUOUS_ROWS if r.kind != "diffusers"))}

# A local UNet2DModel (no download): the DDPM CIFAR-10 layout (google/ddpm-cifar10-32) at half
# width, attention at 16x16 and 8x8, 64 channels per head as ADM.
DIFFUSERS_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(64, 128, 128, 128),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=64, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)


def _build_model(row: Row, fused: bool) -> torch.nn.Module:
    if row.kind == "unet":
        return UNet.from_config(row.config, image_size=row.image_size, fused=fused)
    if row.kind == "vae":
        return VAE.from_config(row.config, fused=fused)
    if row.kind == "diffusers":
        from diffusers import UNet2DModel

        model = UNet2DModel(**{**DIFFUSERS_CONFIG, "sample_size": row.image_size})
        if fused:
            fastdiff.patch(model)
        return model
    raise ValueError(f"unknown row kind {row.kind!r}")


def initial_state(row: Row) -> dict:
    """The weights every provider of ``row`` starts from: a seeded eager model's state_dict."""
    torch.manual_seed(INIT_SEED)
    return _build_model(row, fused=False).state_dict()


def build_step(row: Row, provider: str, state: dict | None = None) -> Callable[[], None]:
    """A closure running one training step of ``row`` for ``provider``: zero_grad, loss on the
    fixed batch, backward, AdamW step; ``step.model`` is its model. ``state``: the initial
    weights (default ``initial_state``)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    model = _build_model(row, fused=provider == "fused")
    model.load_state_dict(initial_state(row) if state is None else state)
    model.train()
    fmt = torch.channels_last if row.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)  # before the optimizer: its state follows the weights' layout
    if provider == "compile":
        # a fresh compile per row, as in a process that trains one model: code objects shared
        # with an earlier row (the same block classes at other shapes) would otherwise recompile
        # with dynamic shapes, where Inductor fails on the VAE
        torch._dynamo.reset()
        if row.kind == "vae":  # the loss calls encode / decode, not forward
            model.encoder.compile()
            model.decoder.compile()
        else:
            model.compile()
    x0 = torch.randn(row.shape, generator=torch.Generator().manual_seed(DATA_SEED)).clamp_(-1, 1)
    x0 = x0.contiguous(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    generator = torch.Generator()

    if row.kind == "vae":
        def loss_fn():
            return model.loss(x0, beta=VAE_BETA, generator=generator.manual_seed(LOSS_SEED))[0]
    else:
        net = (lambda x, t: model(x, t).sample) if row.kind == "diffusers" else model
        diffusion = fastdiff.GaussianDiffusion(net, fastdiff.NoiseSchedule.linear(1000))

        def loss_fn():
            return diffusion.training_loss(x0, generator=generator.manual_seed(LOSS_SEED))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    step.model = model  # for inspection (tests, profiles); the closure holds it anyway
    return step


def build_steps(row: Row, providers) -> tuple[dict, dict]:
    """({provider: step}, {provider: reason}) for the providers that build and run one step
    (torch.compile compiles in that first step; a failure there skips the provider)."""
    state = initial_state(row)
    steps, skipped = {}, {}
    for provider in providers:
        try:
            step = build_step(row, provider, state)
            step()
        except Exception as e:  # noqa: BLE001  (compile failures vary; the table says why)
            if provider != "compile":
                raise
            skipped[provider] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        steps[provider] = step
    return steps, skipped


# -- profile -----------------------------------------------------------------------------

def _is_fused_model_op(name: str) -> bool:
    """A fastdiff op of the model: ``fastdiff::`` ops and the autograd nodes torch.library names
    ``GeneratedBackwardFor_fastdiff_*`` (their self time holds the fused kernels' forward), not
    the diffusion loss's q_sample / diffusion_loss (every provider runs those)."""
    return ("fastdiff::" in name or "fastdiff_" in name) and not any(op in name for op in DIFFUSION_LOSS_OPS)


def fused_op_share(step: Callable[[], None], fused: bool) -> tuple[float, dict]:
    """(share, {op: self CPU seconds}) of one step's self CPU time held by the ops fastdiff
    fuses: the model's fastdiff ops for a fused model, ``EAGER_FUSED_AWAY`` for an eager one."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total, held = 0.0, {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total * 1e-6
        total += seconds
        if _is_fused_model_op(event.key) if fused else event.key in EAGER_FUSED_AWAY:
            held[event.key] = held.get(event.key, 0.0) + seconds
    return (sum(held.values()) / total if total else float("nan")), held


def profile_table(step: Callable[[], None], top: int = 25) -> str:
    """The ``top`` ops of one step by self CPU time (torch.profiler's table)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# -- memory ------------------------------------------------------------------------------

def _measure_one(row_name: str, provider: str) -> int:
    steps, skipped = build_steps(ROWS[row_name], [provider])
    if provider in skipped:
        raise RuntimeError(f"{provider} skipped: {skipped[provider]}")
    step = steps[provider]
    step()  # a second warm-up: the optimizer state exists, buffers are sized
    return peak_step_memory(step)


def isolated_peak_memory(row: Row, provider: str) -> int:
    """Peak RSS growth (bytes) of one step of (row, provider), measured in a fresh process."""
    return run_isolated(MODULE, ["--measure-one", row.name, provider])["peak_bytes"]


# -- run ---------------------------------------------------------------------------------

def _pct(values, q):
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def run_row(row: Row, providers, reps: int, warmup: int = 1, memory=False, profile=False) -> dict:
    """Times (and optionally measures memory / profiles) one row; returns a result dict:
    {"row", "times": {p: [s]}, "skipped": {p: reason}, "peak": {p: bytes}, "share": {p: fraction}}.
    ``build_steps`` already ran one step each, so ``warmup`` more are enough."""
    steps, skipped = build_steps(row, providers)
    times = interleaved_step_times(steps, reps=reps, warmup=warmup)
    share = {}
    if profile:
        for p, step in steps.items():
            share[p] = fused_op_share(step, fused=p == "fused")[0]
    del steps
    peak = {p: isolated_peak_memory(row, p) for p in times} if memory else {}
    return {"row": row, "times": times, "skipped": skipped, "peak": peak, "share": share}


def format_result(res: dict) -> list[str]:
    row, times = res["row"], res["times"]
    ref = statistics.median(times["reference"]) if "reference" in times else None
    lines = []
    for p, ts in times.items():
        med = statistics.median(ts)
        cols = [f"{row.name:15s}", f"{shape_str(row.shape):>11s}", f"{p:9s}", f"{len(ts):4d}",
                f"{med * 1e3:9.1f}", f"{_pct(ts, 0.2) * 1e3:8.1f}-{_pct(ts, 0.8) * 1e3:<8.1f}",
                f"{row.batch / med:8.2f}", f"{ref / med:6.2f}x" if ref else "     -"]
        if res["peak"]:
            mb = res["peak"][p] / 2**20
            ref_mb = res["peak"].get("reference")
            cols += [f"{mb:9.1f}", f"{res['peak'][p] / ref_mb:6.2f}x" if ref_mb else "     -"]
        if res["share"]:
            cols.append(f"{100 * res['share'][p]:6.1f}%")
        lines.append("  ".join(cols))
    for p, reason in res["skipped"].items():
        lines.append(f"{row.name:15s}  {shape_str(row.shape):>11s}  {p:9s}  skipped: {reason}")
    return lines


def header(memory: bool, profile: bool) -> str:
    cols = [f"{'row':15s}", f"{'shape':>11s}", f"{'provider':9s}", "reps", f"{'p50 ms':>9s}",
            f"{'p20-p80 ms':17s}", f"{'img/s':>8s}", "vs ref"]
    if memory:
        cols += [f"{'peak MB':>9s}", "vs ref"]
    if profile:
        cols.append("fused-op share")
    line = "  ".join(cols)
    return line + "\n" + "-" * len(line)


def csv_rows(res: dict, device: str, stamp: str):
    row, times = res["row"], res["times"]
    ref = statistics.median(times["reference"]) if "reference" in times else None
    layout = "channels_last" if row.channels_last else "contiguous"
    config = (f"row={row.name};model={row.kind}:{row.config};optimizer=AdamW;dtype=float32;layout={layout};"
              f"malloc={allocator_setting()}")
    base = {"op": "train_step", "mode": "full", "x_name": "shape", "x_value": shape_str(row.shape),
            "config": config, "device": device, "torch": torch.__version__, "triton": "", "timestamp": stamp}
    for p, ts in times.items():
        med, lo, hi = statistics.median(ts), _pct(ts, 0.2), _pct(ts, 0.8)
        yield base | {"provider": p, "metric": "time", "unit": "ms", "p50": f"{med * 1e3:.6g}",
                      "p20": f"{lo * 1e3:.6g}", "p80": f"{hi * 1e3:.6g}"}
        yield base | {"provider": p, "metric": "throughput", "unit": "images/s", "p50": f"{row.batch / med:.6g}",
                      "p20": f"{row.batch / hi:.6g}", "p80": f"{row.batch / lo:.6g}"}
        if ref:
            yield base | {"provider": p, "metric": "speedup_vs_reference", "unit": "x", "p50": f"{ref / med:.6g}",
                          "p20": "", "p80": ""}
        if p in res["peak"]:
            yield base | {"provider": p, "metric": "peak_rss_growth", "unit": "MB",
                          "p50": f"{res['peak'][p] / 2**20:.6g}", "p20": "", "p80": ""}
        if p in res["share"]:
            yield base | {"provider": p, "metric": "fused_op_share", "unit": "fraction",
                          "p50": f"{res['share'][p]:.4g}", "p20": "", "p80": ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=7, help="timed steps per provider (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per provider after the first")
    ap.add_argument("--memory", action="store_true", help="peak RSS growth of a step (a subprocess per provider)")
    ap.add_argument("--profile", action="store_true", help="share of self CPU time in the ops fastdiff fuses")
    ap.add_argument("--profile-table", metavar="PROVIDER", help="print the top ops of one step of PROVIDER per row")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--measure-one", nargs=2, metavar=("ROW", "PROVIDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_one:
        import json

        print(json.dumps({"peak_bytes": _measure_one(*args.measure_one)}))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for name in rows:
        if name not in ROWS:
            ap.error(f"unknown row {name!r}; known rows: {', '.join(ROWS)}")
    for p in providers:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; known providers: {', '.join(PROVIDERS)}")
    device = device_name(torch.device("cpu"))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"training step (forward, loss, backward, AdamW)  device: {device}  torch {torch.__version__}  "
          f"float32  malloc: {allocator_setting()}  {stamp}", flush=True)
    print(header(args.memory, args.profile), flush=True)
    out_rows = []
    for name in rows:
        row = ROWS[name]
        res = run_row(row, providers, args.reps, args.warmup, args.memory, args.profile)
        print("\n".join(format_result(res)), flush=True)
        out_rows.extend(csv_rows(res, device, stamp))
        if args.profile_table:
            step = build_steps(row, [args.profile_table])[0][args.profile_table]
            step()
            print(f"\n{name} {args.profile_table}: top ops of one step by self CPU time\n{profile_table(step)}",
                  flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
            w.writeheader()
            w.writerows(out_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
