"""fastdiff.benchmark: the benchmark harness behind ``fastdiff bench`` and ``pytest benchmarks``.

Every provider of one case runs in this one process, interleaved: each repetition calls every
provider once, in an order rotated by one per repetition, so drift in a shared machine's load
hits all providers alike. Providers:

- ``reference``: the eager function of fastdiff/reference.py (what users write today);
- ``compile``: ``torch.compile`` of that same function (compilation and warm-up are not timed);
- each fastdiff backend usable on the device, through the public API with ``backend=``:
  ``cpu`` on CPU, ``cuda`` and ``triton`` on CUDA (interpreted Triton on CPU is never timed).

Modes: ``fwd`` (forward under no_grad), ``bwd`` (backward only: the forward runs once, untimed,
and each repetition times ``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)``) and
``full`` (forward + backward).

Reported per case: time (median, p20, p80 in ms), bandwidth (bytes a perfect kernel must move /
time, in GB/s; each case module states its formula per mode), copy_share (that bandwidth over the
machine's copy bandwidth, measured once per run as ``dst.copy_(src)`` on preallocated 256 MB
buffers, bytes = 2 * size) and the speedup of each provider over ``reference`` and ``compile``
(p50: ratio of the medians; p20/p80: percentiles of the per-repetition paired ratios).

The case definitions (inputs, call, bytes, settings) live in benchmarks/bench_<op>.py, installed
as ``fastdiff.benchmarks.bench_<op>``, and serve both this harness and pytest-benchmark.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ._backend import OP_ONLY, reasons_not_usable
from .train.measure import allocator_setting
from .ops import OPS

# Cases beyond the ops: whole modules built on them (benchmarks/bench_<name>.py).
MODULE_CASES = ("attention_block",)
CASES = OPS + MODULE_CASES

MODES = ("fwd", "bwd", "full")
SIZES = {"small": (16, 4, 32, 32), "sd": (64, 4, 64, 64), "pixel": (256, 3, 64, 64)}
DEFAULT_SIZES = ("small", "sd", "pixel")
PROVIDERS = ("reference", "compile", "cpu", "cuda", "triton", "sdpa", "xformers")
BACKEND_PROVIDERS = {"cpu": ("cpu", "sdpa"), "cuda": ("cuda", "triton", "sdpa", "xformers")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
CSV_COLUMNS = ("op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "config",
               "device", "torch", "triton", "timestamp")
METRICS = (("time", "ms"), ("bandwidth", "GB/s"), ("copy_share", "fraction"),
           ("speedup_vs_reference", "x"), ("speedup_vs_compile", "x"))
COPY_BYTES = 256 * 2**20          # size of each copy-bandwidth buffer
TARGET_SECONDS = 1.5              # default time per case per provider (auto reps)
MIN_REPS, MAX_REPS = 10, 20000
CUDA_FLUSH_BYTES = 256 * 2**20    # written between timed CUDA calls so no input stays in L2


# -- case definition ----------------------------------------------------------------------

@dataclass(frozen=True)
class OpCase:
    """One op's benchmark case, defined once in benchmarks/bench_<op>.py.

    setup(shape, device, dtype) -> dict of inputs; call(fn, inputs, **kw) calls ``fn`` (the
    reference function, its compiled version, or the public fastdiff op with kw = {"backend": b})
    on them. grad_inputs: the inputs differentiated in bwd/full. moved[mode]: how many N-element
    tensors a perfect kernel reads + writes (N = numel of the sample); bytes_doc[mode] says which.
    Per-sample scalars (t, coefficients, per-sample losses) and the schedule table are negligible
    and not counted.
    """

    op: str
    config: str
    setup: Callable
    call: Callable
    reference: Callable
    api: Callable
    grad_inputs: tuple
    moved: dict
    bytes_doc: dict
    scalar_output: bool = False
    sizes: tuple = ()  # the op's own default shapes (else --sizes' default)
    # (mode, shape, dtype) -> bytes, for ops whose shape is not one sample's (attention)
    bytes_fn: Callable | None = None
    # the op whose backends the providers name (a module case: the op it is built on)
    backend_op: str | None = None

    @property
    def dispatch_op(self) -> str:
        return self.backend_op or self.op

    def numel(self, shape) -> int:
        n = 1
        for s in shape:
            n *= s
        return n

    def nbytes(self, mode: str, shape, dtype) -> int:
        if self.bytes_fn is not None:
            return self.bytes_fn(mode, shape, dtype)
        return self.moved[mode] * self.numel(shape) * torch.empty((), dtype=dtype).element_size()


def load_case(op: str) -> OpCase:
    if op not in CASES:
        raise ValueError(f"unknown op {op!r}; expected one of {CASES}")
    return importlib.import_module(f"fastdiff.benchmarks.bench_{op}").CASE


# -- providers and runners ------------------------------------------------------------

_compiled: dict = {}


def compiled(fn):
    """torch.compile of a reference function, one wrapper per function per process."""
    if fn not in _compiled:
        import torch._dynamo as dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # each shape x grad mode compiles anew
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
        # the bwd mode times backward(retain_graph=True), which donated buffers forbid
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def provider_fn(case: OpCase, provider: str) -> Callable:
    """inputs -> output for ``provider``."""
    if provider == "reference":
        return lambda inp: case.call(case.reference, inp)
    if provider == "compile":
        fn = compiled(case.reference)
        return lambda inp: case.call(fn, inp)
    if provider in ("cpu", "cuda", "triton", "sdpa", "xformers"):
        return lambda inp: case.call(case.api, inp, backend=provider)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def provider_skip_reason(case: OpCase, provider: str, device: torch.device) -> str:
    """Why ``provider`` is not benchmarked on ``device`` ('' when it is)."""
    if provider in ("reference", "compile"):
        return ""
    if provider == "triton" and device.type == "cpu":
        return "Triton on CPU tensors runs only interpreted (TRITON_INTERPRET=1): far too slow to benchmark"
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}"
    why = reasons_not_usable(provider, case.dispatch_op, device)
    return "; ".join(why)



def make_runner(case: OpCase, provider: str, mode: str, inputs: dict) -> Callable:
    """A zero-argument callable timing one repetition of (provider, mode) on ``inputs``.
    For bwd it runs the forward once here, outside any timed region."""
    fn = provider_fn(case, provider)
    if mode == "fwd":
        def run_fwd():
            with torch.no_grad():
                return fn(inputs)
        return run_fwd
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    inp = dict(inputs)
    for k in case.grad_inputs:
        inp[k] = inputs[k].detach().requires_grad_(True)
    leaves = [inp[k] for k in case.grad_inputs]
    out = fn(inp)
    if case.scalar_output:
        grad_out = torch.ones_like(out)
    else:  # one random upstream gradient per output (ops like sample_and_kl return several)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        outs = out if isinstance(out, tuple) else (out,)
        # in each output's layout, as autograd hands a channels_last output's gradient
        grad_out = tuple(torch.empty_like(o).copy_(torch.randn(o.shape, generator=gen, dtype=o.dtype)) for o in outs)
        grad_out = grad_out if isinstance(out, tuple) else grad_out[0]
    if mode == "bwd":
        def run_bwd():
            return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
        return run_bwd
    del out

    def run_full():
        return torch.autograd.grad(fn(inp), leaves, grad_out)
    return run_full


# -- timing -----------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Flush:
    """Writes a 256 MB buffer between timed CUDA calls (L2 holds no inputs when a call starts)."""

    def __init__(self, device):
        self.buf = torch.empty(CUDA_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" \
            else None

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def warm_up(fn: Callable, device: torch.device, min_calls: int = 3, seconds: float = 0.25) -> float:
    """Runs ``fn`` once (compiles), then until ``seconds`` passed (at least ``min_calls``);
    returns the mean seconds per call of the latter."""
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if n >= min_calls and (elapsed >= seconds or n >= 200):
            return elapsed / n


def time_interleaved(runners: dict, reps: int, device: torch.device) -> dict:
    """{provider: array of seconds per repetition}; each repetition calls every provider once,
    the order rotated by one per repetition."""
    names = list(runners)
    times = {n: np.empty(reps) for n in names}
    flush = _Flush(device)
    cuda = device.type == "cuda"
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(names)
            order = names[k:] + names[:k]
            if cuda:
                events = []
                for n in order:
                    flush()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    runners[n]()
                    end.record()
                    events.append((n, start, end))
                torch.cuda.synchronize(device)
                for n, start, end in events:
                    times[n][r] = start.elapsed_time(end) * 1e-3
            else:
                for n in order:
                    t0 = time.perf_counter()
                    runners[n]()
                    times[n][r] = time.perf_counter() - t0
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def copy_bandwidth(device: torch.device, reps: int = 15) -> float:
    """The machine's copy bandwidth in GB/s: median over ``reps`` of dst.copy_(src) on preallocated
    256 MB buffers, counting 2 * 256 MB (read + write) per copy."""
    n = COPY_BYTES // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - t0)
    del src, dst
    return 2 * COPY_BYTES / float(np.median(samples)) / 1e9


# -- statistics -------------------------------------------------------------------------

def _pct(a, q):
    return float(np.percentile(a, q))


def summarize(times: dict, nbytes: int, copy_bw: float) -> dict:
    """{provider: {metric: (p50, p20, p80)}} from per-repetition seconds."""
    out = {}
    for p, t in times.items():
        bw = nbytes / t / 1e9
        out[p] = {
            "time": (_pct(t, 50) * 1e3, _pct(t, 20) * 1e3, _pct(t, 80) * 1e3),
            "bandwidth": (nbytes / _pct(t, 50) / 1e9, _pct(bw, 20), _pct(bw, 80)),
        }
        b = out[p]["bandwidth"]
        out[p]["copy_share"] = tuple(x / copy_bw for x in b)
    for base in ("reference", "compile"):
        if base not in times:
            continue
        tb = times[base]
        for p, t in times.items():
            paired = tb / t
            out[p][f"speedup_vs_{base}"] = (_pct(tb, 50) / _pct(t, 50), _pct(paired, 20), _pct(paired, 80))
    return out


# -- environment -------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform

        model = platform.processor() or model
    # the vector ISA decides CPU timings as much as the model does (ATen and fastdiff dispatch on it)
    from . import _C_loader

    kernels = f"fastdiff {_C_loader.cpu_capability}" if _C_loader.cpu_capability else "no fastdiff cpu kernels"
    return (f"{model} (ATen {torch.backends.cpu.get_cpu_capability()}, {kernels}, "
            f"{torch.get_num_threads()} threads)")


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001  (not installed or broken: the CSV says so)
        return "none"


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


# -- the run ---------------------------------------------------------------------------

@dataclass
class CaseResult:
    op: str
    config: str
    shape: tuple
    mode: str
    nbytes: int
    reps: int
    stats: dict
    errors: dict = field(default_factory=dict)


def run_case(case: OpCase, shape, mode: str, providers, device, dtype, copy_bw: float, reps=None,
             inputs=None, log=print, layout="contiguous") -> CaseResult:
    inputs = inputs if inputs is not None else case.setup(shape, device, dtype)
    runners, est, errors = {}, {}, {}
    for p in providers:
        try:
            fn = make_runner(case, p, mode, inputs)
            est[p] = warm_up(fn, device)
            runners[p] = fn
        except Exception as e:  # noqa: BLE001  (one provider's failure must not stop the others)
            errors[p] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"  ! {case.op} {shape_str(shape)} {mode} {p}: {errors[p]}")
    n = reps
    if n is None and est:
        n = int(TARGET_SECONDS / (sum(est.values()) / len(est)))
        n = max(MIN_REPS, min(MAX_REPS, n))
    stats = {}
    if runners:
        try:
            times = time_interleaved(runners, n, device)
            stats = summarize(times, case.nbytes(mode, shape, dtype), copy_bw)
        except Exception as e:  # noqa: BLE001
            errors["timing"] = f"{type(e).__name__}: {e}"
            log(f"  ! {case.op} {shape_str(shape)} {mode}: {errors['timing']}")
    res = CaseResult(case.op, case.config + f";dtype={str(dtype).replace('torch.', '')};layout={layout}", tuple(shape), mode,
                     case.nbytes(mode, shape, dtype), n or 0, stats, errors)
    runners.clear()
    gc.collect()
    return res


def _fmt_row(cols, widths, aligns):
    return "  ".join(f"{c:{a}{w}}" for c, w, a in zip(cols, widths, aligns))


def format_table(case: OpCase, results, providers) -> str:
    lines = [f"== {case.op}  [{results[0].config if results else case.config}]"]
    for m in MODES:
        lines.append(f"   bytes {m:<4}: {case.bytes_doc[m]}")
    head = ("shape", "mode", "provider", "reps", "p50 ms", "p20-p80 ms", "GB/s", "copy%", "vs ref", "vs compile")
    widths = (14, 4, 9, 5, 9, 19, 7, 6, 7, 10)
    aligns = ("<", "<", "<", ">", ">", ">", ">", ">", ">", ">")
    lines.append(_fmt_row(head, widths, aligns))
    lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for r in results:
        for p in providers:
            if p not in r.stats:
                if p in r.errors:
                    lines.append(_fmt_row((shape_str(r.shape), r.mode, p, "", "error", "", "", "", "", ""),
                                          widths, aligns))
                continue
            s = r.stats[p]
            t = s["time"]
            ref = s.get("speedup_vs_reference")
            comp = s.get("speedup_vs_compile")
            lines.append(_fmt_row((
                shape_str(r.shape), r.mode, p, str(r.reps), f"{t[0]:.4f}", f"{t[1]:.4f}-{t[2]:.4f}",
                f"{s['bandwidth'][0]:.1f}", f"{100 * s['copy_share'][0]:.0f}%",
                f"{ref[0]:.2f}x" if ref else "-", f"{comp[0]:.2f}x" if comp else "-"), widths, aligns))
    return "\n".join(lines)


def csv_rows(results, device_str: str, stamp: str):
    tv, trv = torch.__version__, triton_version()
    for r in results:
        for p, s in r.stats.items():
            for metric, unit in METRICS:
                if metric not in s:
                    continue
                p50, p20, p80 = s[metric]
                yield {"op": r.op, "provider": p, "mode": r.mode, "metric": metric, "unit": unit,
                       "x_name": "shape", "x_value": shape_str(r.shape), "p50": f"{p50:.6g}",
                       "p20": f"{p20:.6g}", "p80": f"{p80:.6g}", "config": r.config, "device": device_str,
                       "torch": tv, "triton": trv, "timestamp": stamp}


def _load_average() -> str:
    """The 1/5/15-minute load averages (on a shared machine, how busy it was while timing)."""
    try:
        return "  load average %.2f %.2f %.2f" % os.getloadavg()
    except (AttributeError, OSError):
        return ""


def _split(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastdiff bench", description=(
        "Benchmark fastdiff's ops against eager PyTorch and torch.compile, providers interleaved in "
        "one process."))
    ap.add_argument("--ops", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="default: cuda when available, else cpu")
    ap.add_argument("--csv", default=None, help="write the long-format CSV here")
    ap.add_argument("--sizes", default=None,
                    help="comma list of " + ", ".join(f"{k} ({shape_str(v)})" for k, v in SIZES.items())
                    + " or explicit shapes like 32x4x64x64 (default: the op's own shapes, else "
                    + ",".join(DEFAULT_SIZES) + ")")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,full")
    ap.add_argument("--providers", default=None,
                    help=f"comma list of {','.join(PROVIDERS)} (default: reference, compile and "
                         "every backend usable on the device)")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"repetitions per case (default: enough for ~{TARGET_SECONDS:g} s per provider, "
                         f"{MIN_REPS}..{MAX_REPS})")
    ap.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the CPU providers (default: torch's default)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    ap.add_argument("--channels-last", action="store_true",
                    help="4-D inputs in channels_last memory format (e.g. group_norm_silu's NHWC kernels)")
    return ap


def parse_size(s: str):
    if s in SIZES:
        return SIZES[s]
    try:
        shape = tuple(int(x) for x in s.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"size {s!r}: expected one of {tuple(SIZES)} or a shape like 16x4x32x32")
    return shape


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    ops = _split(args.ops)
    for op in ops:
        if op not in CASES:
            ap.error(f"--ops: unknown op {op!r} (expected {','.join(CASES)})")
    modes = _split(args.modes)
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (expected fwd,bwd,full)")
    try:
        sizes = [parse_size(s) for s in _split(args.sizes)] if args.sizes else None
    except argparse.ArgumentTypeError as e:
        ap.error(f"--sizes: {e}")
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be >= 1")
    dev_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device("cuda", torch.cuda.current_device()) if dev_type == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.providers:
        requested = _split(args.providers)
        for p in requested:
            if p not in PROVIDERS:
                ap.error(f"--providers: unknown provider {p!r} (expected {','.join(PROVIDERS)})")
        if args.no_compile:
            requested = [p for p in requested if p != "compile"]
    else:
        requested = ["reference"] + ([] if args.no_compile else ["compile"]) + list(BACKEND_PROVIDERS[dev_type])

    dev_str = device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load = _load_average()
    print(f"fastdiff bench  device: {dev_str}  torch {torch.__version__}  triton {triton_version()}  "
          f"dtype {args.dtype}  {stamp}{load}")
    copy_bw = copy_bandwidth(device)
    print(f"copy bandwidth: {copy_bw:.1f} GB/s (dst.copy_(src), 2 x {COPY_BYTES // 2**20} MB buffers, "
          f"bytes = 2 x size, median)")
    # CPU times of outputs the allocator hands out as fresh pages include the page faults that
    # zero them: glibc's thresholds decide which those are, so the run records them
    malloc = allocator_setting() if device.type == "cpu" else ""
    if malloc:
        print(f"malloc: {malloc}")
    print("time: median and p20-p80 of interleaved repetitions; GB/s = bytes a perfect kernel moves / median; "
          "vs ref / vs compile = ratio of medians\n", flush=True)

    all_results, all_errors = [], []
    for op in ops:
        case = load_case(op)
        providers, skipped = [], []
        for p in requested:
            if OP_ONLY.get(p, case.dispatch_op) != case.dispatch_op:
                continue  # another op's provider (sdpa, xformers: attention only)
            why = provider_skip_reason(case, p, device)
            (skipped.append((p, why)) if why else providers.append(p))
        for p, why in skipped:
            print(f"  (skipping provider {p} for {op}: {why})")
        results = []
        for shape in sizes or case.sizes or [SIZES[s] for s in DEFAULT_SIZES]:
            try:
                inputs = case.setup(shape, device, dtype)
            except ValueError as e:  # a shape of another kind (attention's are B x H x Nq x Nk x D)
                print(f"  (skipping {op} at {shape_str(shape)}: {e})")
                continue
            if args.channels_last:
                inputs = {k: v.to(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
                          for k, v in inputs.items()}
            for mode in modes:
                r = run_case(case, shape, mode, providers, device, dtype, copy_bw, args.reps, inputs,
                             layout="channels_last" if args.channels_last else "contiguous")
                if malloc:
                    r.config += f";malloc={malloc}"
                results.append(r)
                all_errors += [(op, shape_str(shape), mode, p, e) for p, e in r.errors.items()]
            del inputs
            gc.collect()
        print(format_table(case, results, providers) + "\n", flush=True)
        all_results += results

    print(f"end: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}{_load_average()}")
    if all_errors:
        print("provider errors:")
        for op, shp, mode, p, e in all_errors:
            print(f"  {op} {shp} {mode} {p}: {e}")
    else:
        print("provider errors: none")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            n = 0
            for row in csv_rows(all_results, dev_str, stamp):
                w.writerow(row)
                n += 1
        print(f"wrote {n} rows to {args.csv}")
    return 0


# -- pytest-benchmark glue (used by benchmarks/bench_<op>.py) ----------------------------------

def pytest_device() -> torch.device:
    dev = os.environ.get("FASTDIFF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(dev)


def pytest_params(case: OpCase):
    """(argnames, params) for ``pytest.mark.parametrize``: provider x mode x size, the providers that
    cannot run here skipped with their reason. Sizes from FASTDIFF_BENCH_SIZES (default: the op's own
    shapes, else all named ones);
    ``compile`` only with FASTDIFF_BENCH_COMPILE=1 (it compiles every case first)."""
    import pytest

    device = pytest_device()
    default = ",".join(shape_str(shp) for shp in case.sizes) if case.sizes else ",".join(SIZES)
    sizes = _split(os.environ.get("FASTDIFF_BENCH_SIZES", default))
    params = []
    for p in PROVIDERS:
        if OP_ONLY.get(p, case.dispatch_op) != case.dispatch_op:
            continue
        why = provider_skip_reason(case, p, device)
        if p == "compile" and os.environ.get("FASTDIFF_BENCH_COMPILE", "0") in ("", "0"):
            why = "torch.compile cases are opt-in: set FASTDIFF_BENCH_COMPILE=1"
        marks = [pytest.mark.skip(reason=why)] if why else []
        for m in MODES:
            for s in sizes:
                params.append(pytest.param(p, m, s, marks=marks, id=f"{p}-{m}-{s}"))
    return "provider,mode,size", params


def pytest_run(benchmark, case: OpCase, provider: str, mode: str, size: str):
    """Times one (provider, mode, size) of ``case`` with pytest-benchmark's ``benchmark`` fixture."""
    device = pytest_device()
    dtype = DTYPES[os.environ.get("FASTDIFF_BENCH_DTYPE", "float32")]
    shape = parse_size(size)
    inputs = case.setup(shape, device, dtype)
    fn = make_runner(case, provider, mode, inputs)
    warm_up(fn, device, min_calls=2, seconds=0.05)
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize(device)
    else:
        timed = fn
    nbytes = case.nbytes(mode, shape, dtype)
    benchmark.extra_info.update(op=case.op, provider=provider, mode=mode, shape=shape_str(shape), bytes=nbytes,
                                bytes_formula=case.bytes_doc[mode], config=case.config,
                                device=device_name(device))
    benchmark(timed)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and getattr(stats, "median", 0):
        benchmark.extra_info["GB/s"] = nbytes / stats.median / 1e9


if __name__ == "__main__":
    sys.exit(main())
