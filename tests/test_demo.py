from __future__ import annotations

import json

import optuna
import pytest

from ordersearch import load_order
from ordersearch.cli import main
from ordersearch.demo import DemoConfig, run_demo

TINY = DemoConfig(bank="isoresnet:width=8,blocks=3,classes=10", epochs=1, trials=10, adapt_trials=8, batch_size=5,
                  max_len=4, sources="plain=digits:n=200;inv=digits:invert,n=200", sources_arch="isoresnet:width=8",
                  sources_blocks=3, sources_depth=4, sources_epochs=1)
VERDICTS = ("improved", "within noise", "worse")


def test_demo_writes_specs_reports_with_verdicts_and_resumes(tmp_path):
    first = run_demo(TINY, tmp_path)
    assert not first.bank_reused
    plain = first.sources["plain"]["order"]
    assert set(first.sources) == {"plain", "inv"} and 0 <= first.sources["inv"]["test_accuracy"] <= 1
    for part, baseline in (("search", "0-1-2"), ("adapt", plain)):
        p = first.parts[part]
        spec = load_order(tmp_path / part / "best_order.json")
        assert spec.order == p.chosen.order and str(p.baseline.order) == baseline
        assert spec.metadata["evidence"]["verdict"] == p.verdict in VERDICTS
        assert (tmp_path / part / "trials.csv").exists()
        assert p.summary() in (tmp_path / part / "report.md").read_text()
        assert p.engine_stats["block_evals"] <= p.engine_stats["naive_block_evals"]
        assert p.sizes["test"] > 0 and p.test_interval is not None
    adapt = first.parts["adapt"]
    assert adapt.reference is not None  # the unmodified plain model, for comparison
    assert adapt.baseline_name == "source order 'plain' (target statistics)"
    # every source order, the chosen order and the oracle, judged on test; the oracle is the best of them
    rows = {r["name"]: r for r in first.comparison}
    assert {"plain", "inv", "chosen"} <= set(rows) and rows["chosen"]["order"] == str(adapt.chosen.order)
    assert rows["chosen"]["test"] == pytest.approx(adapt.chosen.test)
    assert rows["plain"]["test"] == pytest.approx(adapt.baseline.test)
    assert first.oracle["test"] == max(r["test"] for r in first.comparison) and first.oracle["name"].startswith("oracle")
    assert [r["kind"] for r in first.comparison] == ["source", "source", "chosen", "oracle"]
    report = (tmp_path / "report.md").read_text()
    assert "(identity)" in report and "unmodified `plain` model" in report and "source order `inv`" in report
    assert first.parts["search"].summary() in report and first.parts["adapt"].summary() in report
    assert json.loads((tmp_path / "config.json").read_text())["trials"] == 10

    # a rerun reuses the bank and resumes the finished studies without new trials
    again = run_demo(TINY, tmp_path)
    assert again.bank_reused
    study = optuna.load_study(study_name="demo-adapt", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 8
    assert again.parts["adapt"].chosen == first.parts["adapt"].chosen


def test_demo_cli_prints_the_comparison_and_the_verdicts(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--no-progress", "--bank", TINY.bank, "--epochs", "1",
            "--trials", "6", "--adapt-trials", "6", "--batch-size", "3", "--max-len", "4", "--sources", TINY.sources,
            "--sources-arch", TINY.sources_arch, "--sources-blocks", "3", "--sources-depth", "4",
            "--sources-epochs", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "0-1-2" in out and "AdaBN (plain order, target statistics)" in out and "source order inv" in out
    for part in ("search", "adapt"):
        line = next(x for x in out.splitlines() if x.startswith(f"{part} verdict: "))
        assert line.endswith(VERDICTS)


def test_a_bad_source_spec_fails_before_any_bank_is_trained(tmp_path):
    from dataclasses import replace

    from ordersearch.errors import OrderSearchError

    bad = replace(TINY, sources="plain=digits:n=200;x=nope:foo")
    with pytest.raises(OrderSearchError, match="nope"):
        run_demo(bad, tmp_path)
    assert not (tmp_path / "bank.safetensors").exists() and not (tmp_path / "sources").exists()
    with pytest.raises(OrderSearchError, match="sources-arch must be isoresnet"):
        replace(TINY, sources_arch="vit:width=24")
