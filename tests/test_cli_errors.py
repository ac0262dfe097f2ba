"""Bad input on the command line: exit 2, one short message, no traceback, nothing written.

A table of mistakes users make (wrong paths, malformed files, impossible settings, a label-
hungry objective on an unlabelled command); each case runs the CLI in-process in a fresh folder.
"""

from __future__ import annotations

import pickle

import pytest

from ordersearch.cli import main

BANK = "isoresnet:width=8,blocks=4,classes=10"
FAST = ["--n-images", "60", "--trials", "2", "--no-progress"]


def _search(*extra: str, data: str = "digits") -> list[str]:
    return ["search", "--bank", BANK, "--data", data, *FAST, *extra]


CASES = {
    "no arguments": ["search"],
    "no data": ["search", "--bank", BANK],
    "missing bank file": ["search", "--bank", "nope.safetensors", "--data", "digits", *FAST],
    "unknown bank source": ["search", "--bank", "resnet50", "--data", "digits", *FAST],
    "unknown timm model": ["info", "timm:vit_tinny"],
    "bank of random bytes": ["search", "--bank", "junk.safetensors", "--data", "digits", *FAST],
    "pickled checkpoint": _search("--checkpoint", "pickled.pt"),
    "missing checkpoint": _search("--checkpoint", "missing.pt"),
    "model argument without a value": _search("--model-arg", "depth"),
    "missing data": _search(data="nodata"),
    "bad shift value": _search(data="digits:rotate=abc"),
    "one-class data": _search(data="digits:classes=3"),
    "empty image folder": _search(data="emptydir"),
    "folder without class folders": _search(data="textonly"),
    "zero trials": ["search", "--bank", BANK, "--data", "digits", "--trials", "0", "--no-progress"],
    "trials not a number": _search("--trials", "x"),
    "zero batch": _search("--batch-size", "0"),
    "negative cache": _search("--cache-mb", "-5"),
    "cuda without a GPU": _search("--device", "cuda"),
    "unknown device": _search("--device", "tpu"),
    "unknown dtype": _search("--dtype", "float8"),
    "unknown objective": _search("--objective", "nope"),
    "bad objective option": _search("--objective", "knn:k=0"),
    "empty ensemble": _search("--objective", "ensemble:"),
    "labelled objective on adapt": ["adapt", "--bank", BANK, "--data", "digits", "--objective", "probe", *FAST],
    "unknown searcher": _search("--searcher", "nope"),
    "out is a file": _search("--out", "afile"),
    "out cannot be created": _search("--out", "/proc/no/such"),
    "storage not a URL": _search("--storage", "nourl"),
    "empty order space": _search("--max-len", "0"),
    "prefix out of range": _search("--prefix", "0-9"),
    "fidelities not numbers": _search("--fidelities", "a,b"),
    "subset of one image": ["search", "--bank", BANK, "--data", "digits", "--n-images", "1", "--no-progress"],
    "negative timeout": _search("--timeout", "-1"),
    "no finalists": _search("--finalists", "0"),
    "too few resamples": _search("--resamples", "10"),
    "spec of random bytes": ["show", "random.json"],
    "empty spec": ["show", "empty.json"],
    "missing spec": ["show", "missing.json"],
    "missing study": ["export", "--storage", "sqlite:///nothere.db", "--study", "x"],
    "missing training config": ["train", "--config", "missing.yaml"],
    "training config of random bytes": ["train", "--config", "random.json"],
    "malformed YAML config": ["train", "--config", "bad.yaml"],
    "demo without trials": ["demo", "--trials", "0"],
}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
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


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_in_one_line(folder, capsys, argv):
    before = sorted(p.name for p in folder.rglob("*"))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and 1 <= len(lines) <= 3, err
    assert "error:" in lines[-1]
    # nothing written but the (empty) run folder a search may have created before the check
    after = sorted(p.name for p in folder.rglob("*"))
    assert [p for p in after if p not in before and p not in ("runs", "search", "adapt", "config.json")] == []
