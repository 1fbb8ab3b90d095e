"""``fastdiff train``: argument parsing, torchrun/DDP set-up, signals and clean errors."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

from .._backend import BackendError
from .trainer import AMP_DTYPES, MODELS, TrainConfig, TrainError

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="fastdiff train",
        description="Train a DDPM U-Net (--model ddpm) or a VAE (--model vae) on fastdiff's fused ops. "
                    "Writes checkpoint.pt (atomically, every --checkpoint-every steps and at the end), "
                    "metrics.csv / metrics.json and samples.png to --out. Under torchrun it trains with "
                    "DistributedDataParallel (gloo on CPU, nccl on GPU); --batch is the global batch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--config", default=d.config, help="model size: tiny | small (fastdiff.models configs)")
    p.add_argument("--data", default=d.data,
                   help="'shapes' (embedded, no download), a folder of images, or a .npz / .pt tensor file "
                        "(default: shapes)")
    p.add_argument("--num-images", type=int, default=d.num_images, help="size of the embedded dataset")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=d.batch, help="global batch size")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--channels", type=int, default=d.channels, choices=(1, 3))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=d.ema,
                   help="keep an exponential moving average of the weights (samples use it)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default=d.amp, help="autocast dtype")
    p.add_argument("--backend", default=d.backend, help="fastdiff backend of the fused ops (default: auto)")
    p.add_argument("--reference", action="store_true", help="train the eager reference model instead")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true",
                   help="weights and activations in channels_last (NHWC) memory format")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--beta", type=float, default=d.beta, help="VAE: weight of the KL term")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps of the samples grid")
    p.add_argument("--num-samples", type=int, default=d.num_samples)
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="samples grid every K steps (0: end)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--out", default=d.out, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", action="store_true",
                   help="instead of training: time a few steps of the fused and the reference model "
                        "(and torch.compile with --compile) side by side; prints images/s and peak memory")
    p.add_argument("--compare-steps", type=int, default=10, help="timed steps per side for --compare")
    return p


def config_from_args(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


class StopFlag:
    """SIGTERM / the first Ctrl-C ask the loop to stop after the current step (it then writes a
    checkpoint); a second Ctrl-C interrupts at once (the last checkpoint on disk stays intact)."""

    def __init__(self):
        self.signum = None

    def __call__(self) -> int:
        return self.signum or 0

    def install(self):
        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum
            print(f"\nfastdiff train: {signal.Signals(signum).name} received, stopping after this step "
                  f"(checkpointing)", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def _distributed_env():
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    rank, world_size, local_rank = _distributed_env()
    try:
        if args.compare:
            if world_size > 1:
                raise TrainError("--compare runs in one process; launch it without torchrun")
            from .compare import compare

            return compare(cfg, steps=args.compare_steps)
        return _train(cfg, rank, world_size, local_rank, progress=not args.no_progress)
    except (TrainError, BackendError) as e:  # BackendError: the chosen --backend cannot run here
        print(f"fastdiff train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (or one during --compare): the last checkpoint is intact
        print("fastdiff train: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _train(cfg, rank, world_size, local_rank, progress) -> int:
    import torch
    import torch.distributed as dist

    from .trainer import Trainer, resolve_device

    cfg.check()
    if world_size > 1:
        device = resolve_device(cfg.device, local_rank, world_size)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    stop = StopFlag()
    restore_signals = stop.install()
    try:
        trainer = Trainer(cfg, rank=rank, world_size=world_size, local_rank=local_rank, progress=progress)
        if cfg.resume:
            step = trainer.resume()
            trainer.log(f"resumed from {trainer.checkpoint_path} at step {step}")
            if step >= cfg.steps:
                trainer.log(f"the checkpoint is at step {step} >= --steps {cfg.steps}: nothing to train "
                            f"(pass a larger --steps to go on)")
                return 0
        elif os.path.exists(trainer.checkpoint_path):  # every rank checks: all exit, none waits
            raise TrainError(f"{trainer.checkpoint_path} exists: pass --resume to continue that run, "
                             f"or choose another --out")
        if world_size > 1:
            dist.barrier()  # every rank has read the checkpoint before rank 0 may overwrite it
        summary = trainer.run(stop)
        if rank == 0:
            print(json.dumps(summary, indent=2))
        if summary["interrupted"]:
            trainer.log(f"stopped at step {summary['step']}; resume with --resume --out {cfg.out}")
            return 128 + summary["interrupted"]
        return 0
    finally:
        restore_signals()
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
