from __future__ import annotations

import json

import pandas as pd
import pytest

from ordersearch.cli import main

BANK = "isoresnet:width=8,blocks=4,classes=10"
COMMON = ["--bank", BANK, "--data", "digits:rotate=30", "--n-images", "120", "--batch-size", "4",
          "--reliability-orders", "6", "--no-progress", "--seed", "0"]


def test_search_writes_its_files_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["search", *COMMON, "--searcher", "nsga2", "--trials", "8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    verdict = next(line for line in printed.splitlines() if line.startswith("verdict: "))
    assert verdict.endswith(("improved", "within noise", "worse")) and "held-out" in verdict
    for name in ("best_order.json", "trials.csv", "report.md", "config.json", "study.db",
                 "score_over_trials.png", "best_order.png", "pareto_front.png"):
        assert (out / name).exists(), name
    spec = json.loads((out / "best_order.json").read_text())
    assert spec["objective"] == "probe" and spec["searcher"] == "nsga2" and spec["study"] == "search-probe-nsga2"
    evidence = spec["metadata"]["evidence"]
    assert evidence["summary"] == verdict.removeprefix("verdict: ")
    assert evidence["baseline"] == "0-1-2-3" and evidence["test_interval"]["n"] > 0
    assert "0-1-2-3" in [f["order"] for f in evidence["finalists"]]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 8 and trials["order"][0] == "0-1-2-3"
    report = (out / "report.md").read_text()
    assert verdict.removeprefix("verdict: ") in report and "| identity |" in report and "chosen" in report
    assert "Split-half reliability" in report and "Winner's curse" in report
    assert "Block forwards" in report and "Pareto front" in report
    # the same command resumes the study: a larger budget adds only the missing trials
    assert main([*argv[:-4], "--trials", "10", "--out", str(out)]) == 0
    again = pd.read_csv(out / "trials.csv")
    assert len(again) == 10 and list(again["order"][:8]) == list(trials["order"])


def test_every_output_file_is_written_atomically(tmp_path, monkeypatch):
    import os

    moved: list[tuple[str, str]] = []
    replace = os.replace

    def recording(src, dst):
        moved.append((str(src), str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    out = tmp_path / "run"
    assert main(["search", *COMMON, "--searcher", "random", "--trials", "3", "--finalists", "2",
                 "--out", str(out)]) == 0
    written = {p.name for p in out.iterdir() if not p.name.startswith("study.db")}
    assert written >= {"best_order.json", "trials.csv", "report.md", "config.json", "score_over_trials.png"}
    arrived = {os.path.basename(dst) for src, dst in moved if os.path.dirname(src) == str(out)}
    assert written <= arrived, written - arrived
    temporaries = [src for src, _ in moved]
    assert len(set(temporaries)) == len(temporaries)  # a unique temporary per write
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("change, named", [
    (["--data", "digits:rotate=45"], "other data (images, labels or split): 'digits:rotate=30[search]"),
    (["--seed", "1"], "other data (images, labels or split)"),
    (["--n-images", "100"], "other data (images, labels or split)"),
    (["--norm", "target"], "other engine settings"),
])
def test_resuming_on_other_data_or_settings_is_refused_in_one_line(tmp_path, capsys, change, named):
    out = tmp_path / "run"
    argv = ["search", *COMMON, "--searcher", "random", "--trials", "3", "--finalists", "2", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "trials.csv").read_text()
    capsys.readouterr()
    changed = [*argv, *change]  # argparse: the last occurrence of an option wins
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1 and "--force-new" in err
    assert (out / "trials.csv").read_text() == before  # nothing lost
    # --force-new starts the study afresh on the new settings
    assert main([*changed, "--force-new"]) == 0


def test_adapt_uses_infomax_without_labels_and_export_writes_the_top_orders(tmp_path, capsys):
    out = tmp_path / "adapt"
    argv = ["adapt", *COMMON, "--searcher", "differentiable", "--trials", "4", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "mixing_weights.png").exists()
    spec = json.loads((out / "best_order.json").read_text())
    assert spec["objective"] == "infomax"
    # the search never saw labels: no accuracy among the trials' side metrics
    assert not any(c.startswith("metric_accuracy") for c in pd.read_csv(out / "trials.csv").columns)
    exported = tmp_path / "export"
    assert main(["export", "--storage", f"sqlite:///{out / 'study.db'}", "--study", "adapt-infomax-differentiable",
                 "--top", "2", "--out", str(exported)]) == 0
    assert (exported / "orders" / "rank2.json").exists() and (exported / "report.md").exists()
    rank1 = json.loads((exported / "orders" / "rank1.json").read_text())
    assert rank1["order"] == spec["order"] and rank1["bank"]["fingerprint"] == spec["bank"]["fingerprint"]
    assert rank1["metadata"]["evidence"]["summary"] == spec["metadata"]["evidence"]["summary"]
    # the unsupervised objective is judged by the source head's accuracy on the labelled test split
    assert spec["metadata"]["evidence"]["test_interval"]["metric"] == "head"


def test_a_folder_streamed_from_disk_is_searched_as_one_in_memory(tmp_path, monkeypatch):
    """A folder too large for memory is streamed to memory-mapped files and every derived image
    set (the held-out parts joined to the probe's fit part) written to temporary files: the
    study's trials are those of the same folder loaded into memory."""
    import numpy as np
    from PIL import Image

    from ordersearch import _images
    from ordersearch.data import _load, digits_images

    x, y, _ = digits_images()
    for i in range(90):
        (tmp_path / "f" / f"d{int(y[i])}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "f" / f"d{int(y[i])}" / f"{i}.png")
    argv = ["search", "--bank", BANK, "--data", str(tmp_path / "f"), "--searcher", "random", "--trials", "6",
            "--finalists", "2", "--reliability-orders", "4", "--no-progress", "--seed", "0"]
    assert main([*argv, "--out", str(tmp_path / "memory")]) == 0
    monkeypatch.setattr(_load, "STREAM_BYTES", 0)
    monkeypatch.setattr(_images, "IN_MEMORY_BYTES", 0)
    assert main([*argv, "--out", str(tmp_path / "disk")]) == 0
    assert len(list((_images.cache_root() / "images").glob("*/train.npy"))) == 1
    memory, disk = (pd.read_csv(tmp_path / name / "trials.csv") for name in ("memory", "disk"))
    assert list(disk["order"]) == list(memory["order"]) and list(disk["value"]) == list(memory["value"])
    spec = json.loads((tmp_path / "disk" / "best_order.json").read_text())
    assert spec["metadata"]["evidence"] == json.loads((tmp_path / "memory" / "best_order.json").read_text())["metadata"]["evidence"]
