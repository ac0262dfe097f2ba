from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ordersearch import load_bank, save_order
from ordersearch.cli import main


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_info_on_a_source(capsys):
    assert main(["info", "isoresnet:width=8,blocks=3,classes=10"]) == 0
    out = capsys.readouterr().out
    assert "blocks (K)" in out and "8 x 16 x 16" in out and "fingerprint" in out


def test_info_json_on_a_saved_bank(tmp_path, capsys):
    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    path = bank.save(tmp_path / "bank.safetensors")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_blocks"] == 3 and info["fingerprint"] == bank.fingerprint


def test_show_a_spec(tmp_path, capsys):
    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    bank_path = bank.save(tmp_path / "bank.safetensors")
    spec = save_order(tmp_path / "best.json", load_bank(bank_path), "2-1-1", objective="head", score=0.5,
                      metrics={"test_accuracy": 0.25})
    assert main(["show", str(spec), "--bank", str(bank_path)]) == 0
    out = capsys.readouterr().out
    assert "2-1-1  (depth 3)" in out and "0.5000" in out and "test_accuracy" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "nonsense"], "unknown bank source"),
        (["info", "timm:not_a_model"], "timm has no model"),
        (["show", "missing.json"], "does not exist"),
        (["info", "isoresnet:width=0"], "width must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_bad_subcommand_exits_2():
    proc = subprocess.run([sys.executable, "-m", "ordersearch", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_model_args_reach_timm(capsys):
    argv = ["info", "timm:vit_tiny_patch16_224", "--json", "--model-arg", "img_size=32",
            "--model-arg", "depth=3", "--model-arg", "patch_size=8"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_blocks"] == 3 and info["input_size"] == [3, 32, 32]
    assert main(["info", "timm:vit_tiny_patch16_224", "--model-arg", "depth"]) == 2
    assert "not KEY=VALUE" in capsys.readouterr().err
