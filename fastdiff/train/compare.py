"""``fastdiff train --compare``: the training step of the fused and the eager reference model
(and torch.compile with --compile) timed side by side, interleaved in one process, and the peak
memory of one step of each (on CPU each side in its own process: RSS is per process)."""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys

import torch

from .measure import allocator_setting, interleaved_step_times, peak_step_memory, run_isolated
from .trainer import TrainConfig, TrainError, Trainer


def sides(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """name -> config of each side: reference, fused (+ their torch.compile'd versions)."""
    out = {"reference": dataclasses.replace(cfg, reference=True, compile=False, backend=None),
           "fused": dataclasses.replace(cfg, reference=False, compile=False)}
    if cfg.compile:
        out["reference+compile"] = dataclasses.replace(out["reference"], compile=True)
        out["fused+compile"] = dataclasses.replace(out["fused"], compile=True)
    return out


def _trainer(cfg):
    return Trainer(dataclasses.replace(cfg, ema=False), progress=False, log=lambda *a, **k: None)


def _side_memory(cfg_json: str) -> dict:
    """One side's peak step memory, in this (fresh) process: a warm-up step, then one measured."""
    trainer = _trainer(TrainConfig(**json.loads(cfg_json)))
    trainer.train_step()
    return {"peak_bytes": peak_step_memory(trainer.train_step, trainer.device)}


def compare(cfg: TrainConfig, steps: int = 10, file=sys.stdout) -> int:
    cfg.check()
    if steps < 1:
        raise TrainError(f"--compare-steps must be >= 1, got {steps}")
    configs = sides(cfg)
    trainers = {name: _trainer(c) for name, c in configs.items()}
    device = next(iter(trainers.values())).device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    print(f"fastdiff train --compare: {cfg.model} {cfg.config!r}, {cfg.image_size}x{cfg.image_size}, batch "
          f"{cfg.batch}, amp {cfg.amp}, {device}; {steps} interleaved steps per side after 2 warm-up steps"
          + (f"; malloc: {allocator_setting()}" if device.type == "cpu" else ""),
          file=file, flush=True)
    times = interleaved_step_times({n: t.train_step for n, t in trainers.items()}, reps=steps, warmup=2, sync=sync)
    # each side in a process of its own: on CPU RSS is per process; on CUDA the allocator's peak
    # would otherwise count the weights and optimizer state of every side held here
    memory = {name: run_isolated("fastdiff.train.compare",
                                 ["--side-memory", json.dumps(dataclasses.asdict(configs[name]))])["peak_bytes"]
              for name in configs}
    ref_t, ref_m = statistics.median(times["reference"]), memory["reference"]
    rows = []
    header = f"{'side':18s} {'ms/step':>9s} {'images/s':>9s} {'x ref':>7s} {'peak step MB':>13s} {'x ref':>7s}"
    print(header, file=file)
    for name in configs:
        t, m = statistics.median(times[name]), memory[name]
        rows.append({"side": name, "ms_per_step": round(t * 1e3, 2), "images_per_s": round(cfg.batch / t, 2),
                     "speedup": round(ref_t / t, 3), "peak_step_mb": round(m / 2**20, 1),
                     "memory_ratio": round(m / ref_m, 3) if ref_m else None})
        r = rows[-1]
        print(f"{name:18s} {r['ms_per_step']:9.1f} {r['images_per_s']:9.1f} {r['speedup']:6.2f}x "
              f"{r['peak_step_mb']:13.1f} {r['memory_ratio'] if r['memory_ratio'] is not None else float('nan'):6.2f}x",
              file=file)
    print("peak step memory, each side in a fresh process: " + (
        "the allocator's peak during one step (torch.cuda.max_memory_allocated)" if device.type == "cuda"
        else "RSS growth during one step"), file=file)
    print(json.dumps({"compare": rows}), file=file)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--side-memory":
        print(json.dumps(_side_memory(sys.argv[2])))
    else:
        raise SystemExit("usage: python -m fastdiff.train.compare --side-memory CONFIG_JSON (used by --compare)")
