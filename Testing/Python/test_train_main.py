"""python -m train: the dispatcher lists every command and runs one end to end (tiny segmentation)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train.__main__ import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]


def test_commands_listed():
    assert set(COMMANDS) == {"segment", "track", "pretrain", "synthesize", "default-model"}
    with pytest.raises(SystemExit):
        main(["--help"])


def test_segment_cli_tiny(tmp_path):
    out = tmp_path / "m"
    rc = main(["segment", "-o", str(out), "--phantoms", "1", "--patch-size", "32", "32", "32", "--spacing", "2.5",
               "2", "2", "--features", "2", "4", "8", "--epochs", "1", "--iters", "1", "--batch-size", "1",
               "--device", "cpu", "--threads", "1", "--val-samples", "0"])
    assert rc == 0
    assert (out / "fold_0" / "checkpoint_final.pth").is_file()


def test_bad_options_exit_code(tmp_path, capsys):
    rc = main(["segment", "-o", str(tmp_path / "m"), "--patch-size", "30", "32", "32", "--device", "cpu"])
    assert rc == 2
    assert "divisible" in capsys.readouterr().err
    rc = main(["segment", "-o", str(tmp_path / "m"), "--device", "cpu"])
    assert rc == 2


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "segment" in r.stdout
