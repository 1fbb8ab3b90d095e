"""benchmarks/autograd_path.py: runs every variant, rejects bad arguments by name."""
import pytest

from fastdiff.benchmarks import autograd_path


def test_runs_all_variants(capsys):
    autograd_path.main(["--shape", "2x64x4x4", "--rounds", "1", "--calls", "1", "--threads", "1"])
    out = capsys.readouterr().out
    for name in ("fastdiff-autograd", "fastdiff-direct", "eager-autograd", "eager-direct"):
        assert name in out


def test_channels_last_only_one(capsys):
    autograd_path.main(["--shape", "1x32x3x5", "--channels-last", "--only", "fastdiff-direct", "--rounds", "1",
                        "--calls", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "channels_last" in out and "fastdiff-direct" in out and "eager-direct" not in out


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "2x48x4x4"], "--shape"),
    (["--shape", "2x64x4"], "--shape"),
    (["--shape", "2xax4x4"], "size"),
    (["--rounds", "0"], "--rounds"),
    (["--calls", "-1"], "--calls"),
    (["--threads", "0"], "--threads"),
    (["--only", "nope"], "--only"),
])
def test_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit):
        autograd_path.main(argv)
    assert needle in capsys.readouterr().err
