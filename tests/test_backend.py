"""Backend selection, fastdiff.info(), and the CLI's info command."""
import os
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff._backend import OP_ONLY, BackendError, reasons_not_usable, select


def _args():
    x = torch.randn(2, 4, 8, 8)
    return x, torch.tensor([3, 7]), torch.randn_like(x), fastdiff.NoiseSchedule.linear()


def test_auto_picks_cpu_for_cpu_tensors():
    assert select("q_sample", torch.device("cpu")) == "cpu"


def test_explicit_unusable_backend_lists_every_reason():
    x, t, n, s = _args()
    with pytest.raises(BackendError) as e:
        fastdiff.q_sample(x, t, n, s, backend="cuda")
    msg = str(e.value)
    assert "backend 'cuda' (from backend= argument)" in msg
    for b in fastdiff.BACKENDS:
        assert (f"  {b}: " in msg) == (b not in OP_ONLY)  # sdpa / xformers: attention's only


def test_use_backend_context_and_env(monkeypatch):
    x, t, n, s = _args()
    with fastdiff.use_backend("reference"):
        assert select("q_sample", x.device) == "reference"
        with pytest.raises(BackendError, match="from fastdiff.use_backend"):
            with fastdiff.use_backend("cuda"):
                fastdiff.q_sample(x, t, n, s)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    assert select("q_sample", x.device) == "reference"
    assert select("q_sample", x.device, "cpu") == "cpu"  # the argument wins
    monkeypatch.setenv("FASTDIFF_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        select("q_sample", x.device)


def test_selection_follows_every_change_after_it_is_kept(monkeypatch):
    """select() keeps its answers; each input that can change between calls still counts."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    for _ in range(2):  # the second round answers from what the first kept
        assert select("q_sample", cpu) == "cpu"
        with fastdiff.use_backend("reference"):
            assert select("q_sample", cpu) == "reference"
        monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
        assert select("q_sample", cpu) == "reference"
        assert select("q_sample", cpu, "cpu") == "cpu"
        monkeypatch.setenv("FASTDIFF_BACKEND", "fastest")
        with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
            select("q_sample", cpu)
        monkeypatch.delenv("FASTDIFF_BACKEND")
        with pytest.raises(BackendError, match="from backend= argument"):
            select("q_sample", cpu, "cuda")
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            select("q_sample", cpu, "cudnn")
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            select("q_sample", cpu, ["cpu"])  # not hashable: refused, not a TypeError
    # triton on CPU tensors depends on TRITON_INTERPRET, read again each call
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select("q_sample", cpu, "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        select("q_sample", cpu, "triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastdiff.use_backend("cudnn").__enter__()


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET=1" in r for r in reasons_not_usable("triton", "q_sample", torch.device("cpu")))


def test_backends_agree():
    x, t, n, s = _args()
    outs = {b: fastdiff.q_sample(x, t, n, s, backend=b) for b in ("reference", "cpu")}
    torch.testing.assert_close(outs["cpu"], outs["reference"])


def test_info_reports_build_and_backends():
    report = fastdiff.info(as_dict=True)
    assert report["extension"]["_C loaded"] is True
    assert report["extension"]["cpu kernels"].startswith("fastdiff._C_cpu_")
    assert report["backends"]["cpu"]["cpu"] == "usable"
    assert report["backends"]["cpu"]["cuda"] != "usable"


def test_cli_info_runs():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "cpu kernels" in out.stdout
