"""The `fastdiff` command: train, info, kernels (compile report), bench."""
from __future__ import annotations

import argparse
import sys


def _info(argv):
    parser = argparse.ArgumentParser(prog="fastdiff info", description="Build and backend report.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    import fastdiff

    if args.json:
        import json

        print(json.dumps(fastdiff.info(as_dict=True), indent=2, default=str))
    else:
        fastdiff.info()
    return 0


def _kernels(argv):
    parser = argparse.ArgumentParser(
        prog="fastdiff kernels",
        description="Compile every Triton kernel config to cubin (no GPU needed), list the CUDA kernels in "
                    "fastdiff._C, and print registers / spills / shared memory per kernel and arch. "
                    "Exits non-zero on any spill or compile failure.")
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated archs (default sm_80,sm_90)")
    args = parser.parse_args(argv)
    from . import kernel_report

    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    return kernel_report.run(archs)


def _train(argv):
    from .train.cli import main as train_main

    return train_main(argv)


def _bench(argv):
    from . import benchmark

    return benchmark.main(argv)


COMMANDS = {
    "info": (_info, "versions, what fastdiff._C holds, which backends run where and why not"),
    "kernels": (_kernels, "compile report of every kernel (registers, spills, shared memory)"),
    "train": (_train, "train a DDPM U-Net or a VAE on the fused ops (the main job; torchrun for DDP)"),
    "bench": (_bench, "benchmark every op: reference vs torch.compile vs fastdiff backends"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: fastdiff <command> [options]", "", "commands:"]
        lines += [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nfastdiff: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    fn, _ = COMMANDS[argv[0]]
    return fn(argv[1:])
