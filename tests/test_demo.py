from __future__ import annotations

import json

import optuna

from ordersearch import load_order
from ordersearch.cli import main
from ordersearch.demo import DemoConfig, run_demo

TINY = DemoConfig(bank="isoresnet:width=8,blocks=3,classes=10", epochs=1, trials=10, batch_size=5, max_len=4)


def test_demo_writes_specs_reports_and_resumes(tmp_path):
    first = run_demo(TINY, tmp_path)
    assert not first.bank_reused
    for part in ("search", "adapt"):
        p = first.parts[part]
        spec = load_order(tmp_path / part / "best_order.json")
        assert str(spec.order) == p["best"] and p["identity"] == "0-1-2"
        assert (tmp_path / part / "trials.csv").exists() and (tmp_path / part / "report.md").exists()
        assert p["block_evals"] <= p["naive_block_evals"]
    report = (tmp_path / "report.md").read_text()
    assert "(identity)" in report and "unmodified source model" in report
    assert json.loads((tmp_path / "config.json").read_text())["trials"] == 10

    # a rerun reuses the bank and resumes the finished studies without new trials
    again = run_demo(TINY, tmp_path)
    assert again.bank_reused
    study = optuna.load_study(study_name="demo-adapt", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 10


def test_demo_cli_prints_the_comparison(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--no-progress", "--bank", TINY.bank, "--epochs", "1",
            "--trials", "6", "--batch-size", "3", "--max-len", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "search" in out and "adapt" in out and "0-1-2" in out
