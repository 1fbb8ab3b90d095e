"""`fastdiff train`: exact resume, torchrun/DDP equivalence, interruption, clean errors, outputs.

Runs are tiny (16x16 images, batch 4, a few steps) so the file stays quick on a 2-core CPU.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from fastdiff.train.cli import main
from fastdiff.train.trainer import CHECKPOINT, load_checkpoint

TINY = ["--image-size", "16", "--batch", "4", "--num-images", "64", "--num-samples", "4", "--sample-steps", "2",
        "--log-every", "1", "--no-progress"]


def run(out, *args):
    return main([*TINY, "--out", str(out), *args])


def params(out, key="model"):
    return load_checkpoint(os.path.join(out, CHECKPOINT))[key]


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("model,extra", [("ddpm", []), ("vae", ["--image-size", "16"]), ("ddpm", ["--reference"]),
                                         ("ddpm", ["--channels-last"])])
def test_resume_is_bitwise_exact(tmp_path, model, extra):
    """K steps, then --resume to 2K, equals 2K steps in one run: weights, EMA, optimizer, step.
    13 images in batches of 4: 3 steps an epoch, so the 4 steps cross into a new permutation."""
    extra = [*extra, "--num-images", "13"]
    assert run(tmp_path / "once", "--model", model, "--steps", "4", *extra) == 0
    assert run(tmp_path / "twice", "--model", model, "--steps", "2", *extra) == 0
    assert run(tmp_path / "twice", "--model", model, "--steps", "4", "--resume", *extra) == 0
    once, twice = (load_checkpoint(tmp_path / d / CHECKPOINT) for d in ("once", "twice"))
    assert once["step"] == twice["step"] == 4
    assert_bitwise(once["model"], twice["model"])
    assert_bitwise(once["ema"], twice["ema"])
    assert torch.equal(once["generator"], twice["generator"])
    for s1, s2 in zip(once["optimizer"]["state"].values(), twice["optimizer"]["state"].values()):
        assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    # the resumed run's metrics.csv has every step once, with the uninterrupted run's losses
    rows = [line.split(",") for line in (tmp_path / "twice" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    ref = [line.split(",") for line in (tmp_path / "once" / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == [r[1] for r in ref]


def test_outputs(tmp_path):
    assert run(tmp_path, "--steps", "3", "--sample-every", "2") == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["step"] == 3 and summary["fused"] and not summary["interrupted"]
    assert summary["final_loss"] > 0 and summary["images_per_s"] > 0
    for name in ("samples.png", "samples_000002.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (2 * 16 + 3 * 2,) * 2  # 4 samples: a 2 x 2 grid, 2-pixel padding
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_vae_samples_are_inputs_over_reconstructions(tmp_path):
    assert run(tmp_path, "--model", "vae", "--steps", "1", "--num-samples", "8") == 0
    with Image.open(tmp_path / "samples.png") as im:
        assert im.size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)  # a row of 4 inputs over their reconstructions


@pytest.mark.parametrize("model", ["ddpm", "vae"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs(tmp_path, amp, model):
    assert run(tmp_path / "amp", "--model", model, "--steps", "2", "--amp", amp) == 0
    assert run(tmp_path / "fp32", "--model", model, "--steps", "2") == 0
    amp_state, fp32_state = params(tmp_path / "amp"), params(tmp_path / "fp32")
    assert all(torch.isfinite(v).all() for v in amp_state.values())
    # the autocast run trained (weights moved like the fp32 run's, not bitwise equal to them)
    moved = [k for k in fp32_state if not torch.equal(amp_state[k], fp32_state[k])]
    assert moved
    summary = json.loads((tmp_path / "amp" / "metrics.json").read_text())
    assert summary["amp"] == amp and summary["final_loss"] > 0


@pytest.mark.parametrize("model", ["ddpm", "vae"])
def test_channels_last_trains_like_contiguous(tmp_path, model):
    """--channels-last: weights, EMA and the activations the model sees are NHWC; the losses and
    weights are those of the contiguous run within fp32 tolerance (convolutions sum in another
    order; AdamW's tolerance as in the DDP test)."""
    args = ["--model", model, "--steps", "3"]
    assert run(tmp_path / "nchw", *args) == 0
    assert run(tmp_path / "nhwc", *args, "--channels-last") == 0
    nchw, nhwc = (load_checkpoint(tmp_path / d / CHECKPOINT) for d in ("nchw", "nhwc"))
    spatial = [k for k, v in nhwc["model"].items() if v.dim() == 4 and v.shape[2] > 1]
    assert spatial
    for key in ("model", "ema"):
        for k in spatial:
            assert nhwc[key][k].is_contiguous(memory_format=torch.channels_last), (key, k)
            assert not nhwc[key][k].is_contiguous(), (key, k)
        for k in nchw[key]:
            torch.testing.assert_close(nhwc[key][k], nchw[key][k], rtol=1e-4, atol=1e-4, msg=k)
    losses = [[float(line.split(",")[1]) for line in (tmp_path / d / "metrics.csv").read_text().splitlines()[1:]]
              for d in ("nchw", "nhwc")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)

    from fastdiff.train.trainer import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(model=model, image_size=16, batch=4, num_images=8, channels_last=True,
                                  out=str(tmp_path / "hook")), progress=False)
    seen = []
    first = trainer.net if model == "ddpm" else trainer.net.encoder  # the VAE loss calls encode / decode
    first.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    trainer.train_step()
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


def test_ema_is_not_recorded_by_autograd():
    from fastdiff.train.trainer import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(image_size=16, batch=4, num_images=8, out="/tmp/unused-fastdiff-run"),
                      progress=False)
    for _ in range(2):
        trainer.train_step()
    assert all(not p.requires_grad and p.grad_fn is None for p in trainer.ema.parameters())
    assert any(not torch.equal(e, p) for e, p in zip(trainer.ema.parameters(), trainer.net.parameters()))


def test_resume_past_the_end_trains_nothing(tmp_path, capsys):
    assert run(tmp_path, "--steps", "2") == 0
    before = (tmp_path / CHECKPOINT).stat().st_mtime_ns, (tmp_path / "metrics.json").read_text()
    assert run(tmp_path, "--steps", "2", "--resume") == 0
    assert "nothing to train" in capsys.readouterr().out
    assert before == ((tmp_path / CHECKPOINT).stat().st_mtime_ns, (tmp_path / "metrics.json").read_text())


def test_vae_grid_with_a_small_dataset(tmp_path):
    assert run(tmp_path, "--model", "vae", "--steps", "1", "--num-images", "4", "--num-samples", "36") == 0
    with Image.open(tmp_path / "samples.png") as im:
        assert im.size == (16 + 2 * 2, 6 * 16 + 7 * 2)  # 3 input rows over reconstructions, 1 column


def _free_port():
    # one the OS has free now, per launch: a port derived from the pid collided with a second test run on the
    # same machine (EADDRINUSE); a race remains between closing this socket and torchrun binding the port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(nproc, out, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            "0" if nproc == 1 else str(_free_port()), "-m", "fastdiff", "train", *TINY,
            "--out", str(out), *args]


TORCHRUN_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _torchrun(nproc, out, *args):
    return subprocess.run(_torchrun_cmd(nproc, out, *args), capture_output=True, text=True, env=TORCHRUN_ENV,
                          timeout=600)


@pytest.mark.parametrize("model,extra", [("ddpm", []), ("vae", []), ("ddpm", ["--channels-last"])])
def test_ddp_two_processes_match_one(tmp_path, model, extra):
    """2 gloo ranks of batch 2 each end with the weights of 1 process of batch 4 (fp32 tolerance):
    the same rows, timesteps / posterior noise, gradients averaged by DDP."""
    # 13 images: DistributedSampler drops one for 2 ranks, 3 steps an epoch either way (4 cross it)
    args = ["--model", model, "--steps", "4", "--batch", "4", "--no-ema", "--device", "cpu", "--num-images", "13",
            *extra]
    assert run(tmp_path / "one", *args) == 0
    res = _torchrun(2, tmp_path / "two", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = params(tmp_path / "one"), params(tmp_path / "two")
    # AdamW divides each gradient element by its own RMS, so a near-zero element whose fp32 sum
    # rounds differently (batch 2 + 2 vs 4) can move its weight by up to lr per step: seen on
    # one element in ~37k of some VAE convs (2.7e-5); a wrong row or noise moves every weight.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4, msg=k)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2


def test_ddp_batch_must_split(tmp_path):
    res = _torchrun(2, tmp_path, "--steps", "1", "--batch", "3")
    assert res.returncode != 0
    assert "--batch 3 must be divisible by the number of processes (2)" in res.stderr


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "fastdiff", "train", *TINY, "--out", str(tmp_path), "--steps", "100000",
           "--checkpoint-every", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "resume with --resume" in err + out
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert 2 < state["step"] < 100000
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert run(tmp_path, "--steps", str(state["step"] + 1), "--resume") == 0
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == state["step"] + 1


def test_ddp_sigterm_to_the_job_checkpoints_and_resumes(tmp_path):
    """A scheduler's SIGTERM to the whole torchrun job (agent and both ranks): the ranks agree on
    the stop, rank 0 writes the checkpoint, and torchrun --resume goes on from it."""
    args = ["--steps", "100000", "--checkpoint-every", "1000", "--device", "cpu"]
    proc = subprocess.Popen(_torchrun_cmd(2, tmp_path, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=TORCHRUN_ENV, start_new_session=True)
    metrics = tmp_path / "metrics.csv"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert "resume with --resume" in err + out, err[-3000:]
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert 2 < state["step"] < 100000
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    res = _torchrun(2, tmp_path, "--steps", str(state["step"] + 1), "--device", "cpu", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == state["step"] + 1


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastdiff", "train", *TINY, *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--image-size", "15"], "--image-size 15"),
    (["--model", "vae", "--image-size", "17"], "--image-size 17 must be divisible by 2"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--config", "huge"], "--config 'huge' is not a ddpm config"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--model", "vae", "--beta", "nan"], "--beta must be a number >= 0"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--num-images", "2"], "fewer than --batch 4"),
    (["--reference", "--backend", "cpu"], "--reference trains the eager model"),
    (["--backend", "nope"], "--backend must be auto or one of"),
    (["--backend", "cuda"] if not torch.cuda.is_available() else ["--backend", "nope2"], "cuda"),
])
def test_user_errors_exit_2(tmp_path, capsys, args, message):
    assert run(tmp_path, "--steps", "1", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / CHECKPOINT).exists()


def test_unreadable_image_is_a_clean_error(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(data / "ok.png")
    (data / "broken.png").write_bytes(b"not a png")
    res = _cli("--out", str(tmp_path / "run"), "--data", str(data))
    assert res.returncode == 2 and "broken.png" in res.stderr and "Traceback" not in res.stderr


def test_checkpoint_errors(tmp_path, capsys):
    assert run(tmp_path, "--steps", "1") == 0
    # an existing run is never overwritten without --resume
    assert run(tmp_path, "--steps", "2") == 2
    assert "pass --resume" in capsys.readouterr().err
    # a model of another shape
    assert run(tmp_path, "--steps", "2", "--resume", "--image-size", "8") == 2
    assert "--image-size 16" in capsys.readouterr().err
    # a truncated checkpoint
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:1000])
    assert run(tmp_path, "--steps", "2", "--resume") == 2
    assert "cannot be read" in capsys.readouterr().err
    # nothing to resume
    assert run(tmp_path / "empty", "--steps", "2", "--resume") == 2
    assert "does not exist" in capsys.readouterr().err


def test_image_folder_and_npz_data(tmp_path):
    import numpy as np

    data = tmp_path / "images"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (24, 20), (60 * i, 100, 200)).save(data / f"{i}.png")
    assert run(tmp_path / "a", "--data", str(data), "--steps", "1") == 0
    np.savez(tmp_path / "x.npz", images=np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8))
    assert run(tmp_path / "b", "--data", str(tmp_path / "x.npz"), "--steps", "1") == 0


def test_compare_prints_each_side(capsys):
    assert main([*TINY, "--compare", "--compare-steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])["compare"]
    assert [r["side"] for r in rows] == ["reference", "fused"]
    assert all(r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_step_mb"] > 0 for r in rows)


def test_out_that_is_a_file_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(tmp_path / "file", "--steps", "1") == 2
    assert "cannot be used as the run folder" in capsys.readouterr().err


def test_resume_mid_log_interval_keeps_the_metrics_rows(tmp_path):
    """A run stopped (SIGTERM) inside a log interval checkpoints the interval's partial sums: the
    resumed run's rows equal the uninterrupted run's (the same steps averaged)."""
    from fastdiff.train.cli import build_parser, config_from_args
    from fastdiff.train.trainer import Trainer

    args = ["--steps", "4", "--log-every", "2", "--checkpoint-every", "0"]
    assert run(tmp_path / "once", *args) == 0
    cfg = config_from_args(build_parser().parse_args([*TINY, *args, "--out", str(tmp_path / "twice")]))
    trainer = Trainer(cfg, progress=False)
    summary = trainer.run(stop_requested=lambda: int(signal.SIGTERM) if trainer.step >= 3 else 0)
    assert summary["interrupted"] == signal.SIGTERM and summary["step"] == 3
    assert run(tmp_path / "twice", *args, "--resume") == 0
    rows = {d: [line.split(",")[:2] for line in (tmp_path / d / "metrics.csv").read_text().splitlines()[1:]]
            for d in ("once", "twice")}
    assert rows["twice"] == rows["once"] and [r[0] for r in rows["once"]] == ["2", "4"]
