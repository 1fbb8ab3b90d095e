"""The training-step benchmark (benchmarks/bench_training.py) and fastdiff.train.measure."""
import csv
import dataclasses

import pytest
import torch

from fastdiff.benchmark import CSV_COLUMNS
from fastdiff.benchmarks import bench_training as bt
from fastdiff.train import measure


def test_interleaved_step_times_warms_up_then_times_each_provider_reps_times():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    times = measure.interleaved_step_times(steps, reps=4, warmup=2)
    assert set(times) == {"a", "b", "c"}
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())
    assert calls[:6] == ["a", "b", "c"] * 2  # warm-up first
    assert calls[6:9] == ["a", "b", "c"] and calls[9:12] == ["b", "c", "a"]  # order rotated per rep
    with pytest.raises(ValueError):
        measure.interleaved_step_times(steps, reps=0)


def test_allocator_setting_names_the_malloc_setup(monkeypatch):
    for name in ("LD_PRELOAD",) + measure._MALLOC_VARS:
        monkeypatch.delenv(name, raising=False)
    assert measure.allocator_setting() == "glibc default"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "100")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert measure.allocator_setting() == "glibc MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=100"
    monkeypatch.setenv("LD_PRELOAD", "libfoo.so:/usr/lib/libjemalloc.so.2")
    assert measure.allocator_setting() == "LD_PRELOAD=/usr/lib/libjemalloc.so.2"


def test_peak_step_memory_cpu_sees_an_allocation():
    def step():
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        x.add_(1)
    assert measure.peak_step_memory(step) > 16 * 2**20


@pytest.mark.parametrize("name", ["unet-tiny", "vae-tiny", "unet-tiny-nhwc"])
def test_tiny_row_steps_start_equal_and_train(name):
    row = dataclasses.replace(bt.ROWS[name], batch=2)
    state = bt.initial_state(row)
    steps = {p: bt.build_step(row, p, state) for p in ("reference", "fused")}
    for p, step in steps.items():
        before = {k: v.clone() for k, v in step.model.state_dict().items()}
        assert before.keys() == state.keys() and all(torch.equal(before[k], state[k]) for k in state)
        step()
        after = step.model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{p}: AdamW changed nothing"
        assert all(torch.isfinite(v).all() for v in after.values())
    assert steps["fused"].model.fused and not steps["reference"].model.fused
    for step in steps.values():  # -nhwc rows train in channels_last, the others contiguous
        convs = [m.weight for m in step.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == row.channels_last
                             and w.is_contiguous() != row.channels_last for w in convs)
    times = measure.interleaved_step_times(steps, reps=1, warmup=0)
    assert all(len(v) == 1 for v in times.values())


def test_diffusers_row_fused_provider_is_patched():
    pytest.importorskip("diffusers")
    row = dataclasses.replace(bt.ROWS["diffusers-unet"], batch=1)
    ref, fused = bt.build_step(row, "reference"), bt.build_step(row, "fused")
    from fastdiff.diffusers import AttnProcessor

    def patched(model):  # fastdiff.patch swaps the resnets' forward and the attention processors
        return (any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "ResnetBlock2D"),
                any(isinstance(getattr(m, "processor", None), AttnProcessor) for m in model.modules()))
    assert patched(fused.model) == (True, True) and patched(ref.model) == (False, False)
    ref()
    fused()


def test_cli_tiny_row_prints_table_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "train.csv"
    assert bt.main(["--rows", "unet-tiny", "--providers", "reference,fused", "--reps", "1", "--warmup", "0",
                    "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unet-tiny" in text and "fused" in text and "img/s" in text
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    metrics = {(r["provider"], r["metric"]) for r in rows}
    assert {("reference", "time"), ("fused", "throughput"), ("fused", "speedup_vs_reference")} <= metrics


def test_cli_rejects_unknown_row():
    with pytest.raises(SystemExit):
        bt.main(["--rows", "no-such-row"])


def test_memory_subprocess_returns_positive_peak():
    assert bt.isolated_peak_memory(bt.ROWS["unet-tiny"], "fused") > 0
