"""fastdiff bench end to end at tiny sizes: shapes of another kind are skipped with the reason,
op-only providers (sdpa) run only for their op, the CSV holds what ran."""
import csv

from fastdiff.benchmark import main


def test_bench_cli_small(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    rc = main(["--device", "cpu", "--ops", "attention,q_sample", "--sizes", "small,1x2x33x77x16", "--modes", "fwd",
               "--no-compile", "--reps", "2", "--csv", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "skipping attention at 16x4x32x32: attention sizes are B x H x Nq x Nk x D" in text
    rows = list(csv.DictReader(open(out)))
    ran = {(r["op"], r["provider"], r["x_value"]) for r in rows if r["metric"] == "time"}
    assert ("attention", "cpu", "1x2x33x77x16") in ran and ("attention", "sdpa", "1x2x33x77x16") in ran
    assert ("q_sample", "cpu", "16x4x32x32") in ran
    assert not any(op == "q_sample" and p == "sdpa" for op, p, _ in ran)  # sdpa runs attention only


def test_bench_records_the_cpu_allocator(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    out = tmp_path / "bench.csv"
    assert main(["--device", "cpu", "--ops", "q_sample", "--sizes", "2x3x4x4", "--modes", "fwd", "--no-compile",
                 "--reps", "2", "--csv", str(out)]) == 0
    assert "malloc: glibc MALLOC_TRIM_THRESHOLD_=12345" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert rows and all(r["config"].endswith(";malloc=glibc MALLOC_TRIM_THRESHOLD_=12345") for r in rows)
