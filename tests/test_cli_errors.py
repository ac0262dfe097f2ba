"""Bad input on the command line: exit 2, one short message, no traceback, nothing written.

A table of mistakes users make (wrong paths, malformed files, impossible settings, a label-
hungry objective on an unlabelled command); each case runs the CLI in-process in a fresh folder.
"""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from ordersearch.cli import main

BANK = "isoresnet:width=8,blocks=4,classes=10"
FAST = ["--n-images", "60", "--trials", "2", "--no-progress"]


def _search(*extra: str, data: str = "digits") -> list[str]:
    return ["search", "--bank", BANK, "--data", data, *FAST, *extra]


CASES = {  # name: (argv, what the one line must say)
    "no arguments": (["search"], "required: --bank, --data"),
    "no data": (["search", "--bank", BANK], "required: --data"),
    "missing bank file": (["search", "--bank", "nope.safetensors", "--data", "digits", *FAST], "does not exist"),
    "unknown bank source": (["search", "--bank", "resnet50", "--data", "digits", *FAST], "unknown bank source"),
    "unknown timm model": (["info", "timm:vit_tinny"], "timm has no model 'vit_tinny'"),
    "bank of random bytes": (["search", "--bank", "junk.safetensors", "--data", "digits", *FAST],
                             "not a readable safetensors bank"),
    "pickled checkpoint": (_search("--checkpoint", "pickled.pt"), "holds pickled objects"),
    "missing checkpoint": (_search("--checkpoint", "missing.pt"), "checkpoint missing.pt does not exist"),
    "model argument without a value": (_search("--model-arg", "depth"), "is not KEY=VALUE"),
    "missing data": (_search(data="nodata"), "no such file or folder: nodata"),
    "bad shift value": (_search(data="digits:rotate=abc"), "rotate=abc"),
    "one-class data": (_search(data="digits:classes=3"), "at least 2 classes"),
    "empty image folder": (_search(data="emptydir"), "class folder"),
    "folder without class folders": (_search(data="textonly"), "class folder"),
    "zero trials": (["search", "--bank", BANK, "--data", "digits", "--trials", "0", "--no-progress"],
                    "--trials and --batch-size must be >= 1"),
    "trials not a number": (_search("--trials", "x"), "invalid int value: 'x'"),
    "zero batch": (_search("--batch-size", "0"), "--trials and --batch-size must be >= 1"),
    "negative cache": (_search("--cache-mb", "-5"), "--cache-mb must be 0 or more"),
    "cuda without a GPU": (_search("--device", "cuda:7"), "no CUDA device"),
    "unknown device": (_search("--device", "tpu"), "is not a torch device"),
    "unknown dtype": (_search("--dtype", "float8"), "invalid choice: 'float8'"),
    "unknown objective": (_search("--objective", "nope"), "unknown objective 'nope'"),
    "bad objective option": (_search("--objective", "knn:k=0"), "k must be >= 1"),
    "empty ensemble": (_search("--objective", "ensemble:"), "unknown objective ''"),
    "labelled objective on adapt": (["adapt", "--bank", BANK, "--data", "digits", "--objective", "probe", *FAST],
                                    "adapt uses no labels"),
    "unknown searcher": (_search("--searcher", "annealing"), "invalid choice: 'annealing'"),
    "exhaustive over a huge space": (_search("--searcher", "exhaustive", "--max-len", "9", "--max-repeats", "0"),
                                     "exhaustive search refuses"),
    "out is a file": (_search("--out", "afile"), "is a file, not a folder"),
    "out cannot be created": (_search("--out", "/proc/no/such"), "cannot create --out"),
    "storage not a URL": (_search("--storage", "nourl"), "storage must be an Optuna storage URL"),
    "empty order space": (_search("--max-len", "0"), "order lengths 1..0 are empty"),
    "lengths beyond the space": (_search("--max-repeats", "1", "--min-len", "7"), "order lengths 7..4 are empty"),
    "prefix out of range": (_search("--prefix", "0-9"), "uses block 9"),
    "fidelities not numbers": (_search("--fidelities", "a,b"), "--fidelities must be image counts"),
    "two split shares": (_search("--splits", "60/40"), "give three positive train/val/test shares"),
    "subset of one image": (["search", "--bank", BANK, "--data", "digits", "--n-images", "1", "--no-progress"],
                            "subset size must be in 2.."),
    "negative timeout": (_search("--timeout", "-1"), "timeout must be a positive number"),
    "no finalists": (_search("--finalists", "0"), "finalists must be >= 1"),
    "too few resamples": (_search("--resamples", "10"), "needs >= 1000 resamples"),
    "spec of random bytes": (["show", "random.json"], "is not text"),
    "empty spec": (["show", "empty.json"], "truncated or not JSON"),
    "missing spec": (["show", "missing.json"], "does not exist"),
    "missing study database": (["export", "--storage", "sqlite:///nothere.db", "--study", "x"],
                               "no study database at nothere.db"),
    "export storage not a URL": (["export", "--storage", "nonsense", "--study", "x"],
                                 "storage must be an Optuna storage URL"),
    "missing training config": (["train", "--config", "missing.yaml"], "does not exist"),
    "training config of random bytes": (["train", "--config", "random.json"], "is not text"),
    "malformed YAML config": (["train", "--config", "bad.yaml"], "is not valid YAML"),
    "demo without trials": (["demo", "--trials", "0"], "demo trials must be >= 1"),
    "zero jobs": (_search("--jobs", "0"), "--jobs must be >= 1"),
    "worker without a study database": (["worker", "--storage", "sqlite:///nothere.db", "--study", "x"],
                                        "no study database at nothere.db"),
    "worker on a missing study": (["worker", "--storage", "sqlite:///plain.db", "--study", "x"],
                                  "no study 'x' in sqlite:///plain.db; studies there: plain"),
    "worker on a study no command started": (["worker", "--storage", "sqlite:///plain.db", "--study", "plain"],
                                             "was not started by `ordersearch search` or `adapt`"),
}


@pytest.fixture(scope="module")
def plain_db(tmp_path_factory):
    """A study made by Optuna alone (no run settings a worker could join with)."""
    import optuna

    path = tmp_path_factory.mktemp("plain") / "plain.db"
    optuna.create_study(study_name="plain", storage=f"sqlite:///{path}")
    return path


@pytest.fixture
def folder(tmp_path, monkeypatch, plain_db):
    monkeypatch.chdir(tmp_path)
    shutil.copy(plain_db, tmp_path / "plain.db")
    (tmp_path / "afile").write_text("x")
    noise = bytes(range(128, 256)) * 2
    for name in ("random.json", "junk.safetensors"):
        (tmp_path / name).write_bytes(noise)
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "a.txt").write_text("hi")
    return tmp_path


def test_the_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("argv, message", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_in_one_line(folder, capsys, argv, message):
    if argv[-2:] == ["--device", "cuda:7"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = sorted(p.name for p in folder.rglob("*"))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and 1 <= len(lines) <= 3, err
    assert "error:" in lines[-1] and message in lines[-1], lines[-1]
    # nothing written but the (empty) run folder a search may have created before the check
    after = sorted(p.name for p in folder.rglob("*"))
    assert [p for p in after if p not in before and p not in ("runs", "search", "adapt", "config.json")] == []
