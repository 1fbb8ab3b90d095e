"""What the autograd engine adds to group_norm_silu's backward, for fastdiff and for the eager
pair: the same backward through ``torch.autograd.grad`` on a retained graph, and its ops called
directly (fastdiff: ``_group_norm_silu_bwd``; eager: ``silu_backward`` +
``native_group_norm_backward``).

  python benchmarks/autograd_path.py --shape 2x1280x16x16               # the four, interleaved
  python benchmarks/autograd_path.py --shape 2x1280x16x16 --only fastdiff-autograd   # one, alone

Prints the median of per-call times over rounds of --calls calls. Alone, a variant runs in a
tight loop as a training step would repeat it; interleaved, each round runs after the others.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastdiff  # noqa: F401  (registers torch.ops.fastdiff)
from fastdiff.benchmark import parse_size

GROUPS = 32


def variants(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0 = 1 + 0.1 * torch.randn(shape[1], generator=g)
    b0 = 0.1 * torch.randn(shape[1], generator=g)
    x, w, b = (t.detach().requires_grad_(True) for t in (x0, w0, b0))
    n, c, hw = shape[0], shape[1], x0[0, 0].numel()

    fused, mean, rstd = torch.ops.fastdiff.group_norm_silu(x, w, b, GROUPS, 1e-5, True)
    normed = F.group_norm(x, GROUPS, w, b, 1e-5)
    eager = F.silu(normed)
    grad = torch.empty_like(fused).copy_(torch.randn(shape, generator=g))
    mean0, rstd0, normed0 = mean.detach(), rstd.detach(), normed.detach()
    _, emean, erstd = torch.native_group_norm(x0, w0, b0, n, c, hw, GROUPS, 1e-5)

    def eager_direct():
        da = torch.ops.aten.silu_backward(grad, normed0)
        torch.ops.aten.native_group_norm_backward(da, x0, emean, erstd, w0, n, c, hw, GROUPS, [True, True, True])

    return {
        "fastdiff-autograd": lambda: torch.autograd.grad(fused, (x, w, b), grad, retain_graph=True),
        "fastdiff-direct": lambda: torch.ops.fastdiff._group_norm_silu_bwd(grad, x0, w0, b0, mean0, rstd0, GROUPS,
                                                                          True),
        "eager-autograd": lambda: torch.autograd.grad(eager, (x, w, b), grad, retain_graph=True),
        "eager-direct": eager_direct,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2x1280x16x16", type=parse_size, help="NxCxHxW")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--only", help="one variant, alone in this process")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    shape = args.shape
    if len(shape) != 4 or shape[1] % GROUPS:
        ap.error(f"--shape must be NxCxHxW with C divisible by {GROUPS}, got {'x'.join(map(str, shape))}")
    for name in ("rounds", "calls", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    fns = variants(shape, args.channels_last)
    if args.only is not None:
        if args.only not in fns:
            ap.error(f"--only must be one of {', '.join(fns)}, got {args.only!r}")
        fns = {args.only: fns[args.only]}
    times = {k: [] for k in fns}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(args.calls):
                f()
            if r >= 2:
                times[k].append((time.perf_counter() - t) / args.calls)
    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"shape {'x'.join(map(str, shape))} {layout}, {args.threads} threads, median of {args.rounds} rounds x {args.calls} calls")
    for k, v in times.items():
        print(f"  {k:18s} {statistics.median(v) * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
