"""The search-run layer: disjoint splits, held-out selection, bootstrap intervals, verdicts and
specs that rebuild their models."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import timm
import torch
from PIL import Image

import ordersearch
from ordersearch import EngineConfig, SearchJob, SelectionConfig, load_bank, load_order
from ordersearch.cli import main
from ordersearch.data import load
from ordersearch.engine import get_objective
from ordersearch.evalset import EvalSet
from ordersearch.search import JobResult, Splits, held_out, make_splits, paired_bootstrap, verdict_of

BANK = "isoresnet:width=8,blocks=3,classes=10"


def _markers(es: EvalSet | None) -> set[float]:
    """Each test image is constant, with a value unique to it: its identity after preprocessing."""
    if es is None:
        return set()
    values = es.x.flatten(1)
    assert torch.allclose(values.min(1).values, values.max(1).values, atol=1e-4)  # still constant
    return {round(float(v), 4) for v in values[:, 0]}


def _assert_disjoint(splits: Splits, total: int) -> None:
    parts = [_markers(splits.search), _markers(splits.select), _markers(splits.test)]
    sizes = [len(splits.search), len(splits.select), 0 if splits.test is None else len(splits.test)]
    assert [len(p) for p in parts] == sizes  # no image twice within a part
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(sizes) == total


def _constant_images(n: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    x = (np.arange(n, dtype=np.float32) / n)[:, None, None, None] * np.ones((1, 1, size, size), np.float32)
    return x, np.arange(n) % 4


def test_splits_are_disjoint_for_every_data_source(tmp_path):
    cfg = {"input_size": (1, 16, 16), "mean": 0.5, "std": 0.5}
    # digits: the fixed seeded train/val/test splits (positions in scikit-learn's order)
    data = load("digits:rotate=30", cfg, seed=3)
    s = make_splits(data, labelled=True, seed=3)
    idx = [set(data.index[k].tolist()) for k in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert s.sizes() == {"search": len(idx[0]), "select": len(idx[1]), "test": len(idx[2])}
    # a tensor file split 60/20/20 by the loader, and one that comes with train and test only
    x, y = _constant_images(100)
    np.savez(tmp_path / "one.npz", x=x, y=y)
    _assert_disjoint(make_splits(load(f"{tmp_path / 'one.npz'}:norm=none", cfg), labelled=True), 100)
    np.savez(tmp_path / "pre.npz", x_train=x[:70], y_train=y[:70], x_test=x[70:], y_test=y[70:])
    carved = make_splits(load(f"{tmp_path / 'pre.npz'}:norm=none", cfg), labelled=True, select_share=0.25)
    _assert_disjoint(carved, 100)
    assert abs(len(carved.select) - 0.25 * 70) <= 2 and any("no val split" in n for n in carved.notes)
    # an image folder (ImageFolder layout, split by the loader)
    for i in range(40):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 10), 5 * i + 3, np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    _assert_disjoint(make_splits(load(str(tmp_path / "imgs"), cfg), labelled=True), 40)
    # unlabelled data: no test part, said in the notes; the search part subsets when asked
    np.savez(tmp_path / "u.npz", x=x)
    free = make_splits(load(f"{tmp_path / 'u.npz'}:norm=none", cfg), labelled=False, n_images=30)
    assert free.test is None and len(free.search) == 30 and not free.search.has_labels
    assert any("verdict is read on select" in n for n in free.notes)


def test_held_out_probe_keeps_the_search_fit_part():
    bank = load_bank(BANK)
    s = make_splits(load("digits:n=400", bank.data_config), labelled=True)
    probe = get_objective("probe")
    es = held_out(probe, s.search, s.select)
    assert len(es.train_idx) == len(s.search.train_idx) and len(es.val_idx) == len(s.select)
    assert torch.equal(es.x[es.train_idx], s.search.x[s.search.train_idx])
    assert torch.equal(es.x[es.val_idx], s.select.x)
    assert held_out(get_objective("infomax"), s.search, s.select) is s.select


def test_bootstrap_interval_has_the_known_answer():
    n = 400
    y = torch.arange(n) % 4
    es = EvalSet(torch.zeros(n, 1, 2, 2), y)
    right = torch.nn.functional.one_hot(y, 4).double() * 5
    half = right.clone()
    half[: n // 2] = torch.nn.functional.one_hot((y[: n // 2] + 1) % 4, 4).double() * 5  # wrong on half
    head = get_objective("head")
    iv = paired_bootstrap(head, right, half, es, split="test", resamples=4000, seed=1)
    # per-image differences are 0/1 with mean 0.5: the interval is 0.5 +- 1.96 * sqrt(0.25 / n)
    se = (0.25 / n) ** 0.5
    assert iv.diff == pytest.approx(0.5) and iv.n == n
    assert iv.low == pytest.approx(0.5 - 1.96 * se, abs=0.01) and iv.high == pytest.approx(0.5 + 1.96 * se, abs=0.01)
    assert iv.verdict == "improved"
    assert paired_bootstrap(head, half, right, es, split="test", seed=1).verdict == "worse"
    # same outputs: no difference at all, whatever the resample (infomax recomputes per resample)
    same = paired_bootstrap(get_objective("infomax"), half, half, es, split="select", seed=2)
    assert (same.diff, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "within noise")
    # the batched infomax resampling equals scoring each resample on its own
    idx = torch.randint(n, (5, n), generator=torch.Generator().manual_seed(0))
    info = get_objective("infomax")
    fast = info.resampled_values(half, es, None, idx)
    slow = [info.score(half[r], EvalSet(es.x[r]), None)[0] for r in idx]
    assert fast.tolist() == pytest.approx(slow, abs=1e-12)


def test_a_difference_within_noise_is_called_so():
    n = 300
    y = torch.arange(n) % 3
    es = EvalSet(torch.zeros(n, 1, 2, 2), y)
    right = torch.nn.functional.one_hot(y, 3).double()
    wrong = torch.nn.functional.one_hot((y + 1) % 3, 3).double()
    a, b = right.clone(), right.clone()
    a[:6], b[6:14] = wrong[:6], wrong[6:14]  # 6 images a gets wrong, 8 that b does: +2 of 300
    iv = paired_bootstrap(get_objective("head"), a, b, es, split="test", seed=0)
    assert iv.diff == pytest.approx(2 / 300) and iv.low < 0 < iv.high and iv.verdict == "within noise"
    assert (verdict_of(0.01, 0.2), verdict_of(-0.2, -0.01), verdict_of(-0.1, 0.1)) == (
        "improved", "worse", "within noise")


def test_the_baseline_is_always_a_finalist_and_the_choice_is_made_on_select(tmp_path):
    bank = load_bank(BANK)
    data = load("digits:rotate=60,n=400", bank.data_config)
    job = SearchJob(bank=bank, data=data, objective="probe", searcher="random", n_trials=12, batch_size=4,
                    selection=SelectionConfig(finalists=2, reliability_orders=0), seed=1,
                    storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    result = job.run()
    orders = [f.order for f in result.finalists]
    assert bank.identity in orders and len(set(orders)) == len(orders) and 2 <= len(orders) <= 3
    assert result.baseline.order == bank.identity and result.baseline.baseline
    assert result.chosen.select == max(f.select for f in result.finalists)
    assert [f.select for f in result.finalists] == sorted((f.select for f in result.finalists), reverse=True)
    assert result.verdict in ("improved", "within noise", "worse") and result.summary().endswith(result.verdict)
    assert result.summary().startswith("best " if result.verdict == "improved" else "no better order found: ")
    assert result.winners_curse == pytest.approx(result.chosen.search - result.chosen.select)
    # the result is written once into the study and read back whole
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    again = JobResult.from_study(study)
    assert again.summary() == result.summary() and again.finalists == result.finalists
    assert set(study.user_attrs) == {"ordersearch", "ordersearch_result"}


def test_a_run_without_better_order_says_so():
    bank = load_bank(BANK)
    data = load("digits:n=300", bank.data_config)
    # a space holding the identity only: nothing can beat it
    space = ordersearch.OrderSpace(3, min_len=3, max_len=3, max_repeats=1, prefix=(0, 1, 2))
    result = SearchJob(bank=bank, data=data, objective="probe", searcher="random", space=space, n_trials=3,
                       selection=SelectionConfig(reliability_orders=0)).run()
    assert result.chosen.order == bank.identity and result.verdict == "within noise"
    assert result.summary().startswith("no better order found")


def test_adapt_judges_with_the_head_and_reports_the_unmodified_model():
    bank = load_bank(BANK)
    data = load("digits:rotate=30,n=300", bank.data_config)
    result = SearchJob(bank=bank, data=data, objective="infomax", searcher="random", n_trials=6,
                       engine=EngineConfig(norm="target"), selection=SelectionConfig(reliability_orders=0)).run()
    assert result.truth == "head" and result.test_interval is not None and result.test_interval.metric == "head"
    assert result.select_interval.metric == "infomax" and result.reference is not None
    assert "target statistics" in result.baseline_name


def test_target_norm_on_a_bank_without_batchnorm_warns_and_says_so_in_the_report(caplog, tmp_path):
    bank = load_bank("timm:vit_tiny_patch16_224", seed=0, **dict(VIT, img_size=16, patch_size=4, num_classes=10))
    data = load("digits:n=200", bank.data_config)
    with caplog.at_level("WARNING", logger="ordersearch"):
        result = SearchJob(bank=bank, data=data, objective="infomax", searcher="random", n_trials=3,
                           engine=EngineConfig(norm="target"), selection=SelectionConfig(reliability_orders=0)).run()
    assert any("has no BatchNorm layers" in r.getMessage() for r in caplog.records)
    assert any("--norm target" in n and "no BatchNorm" in n for n in result.notes)


# --- specs rebuild real models ---------------------------------------------------------------

VIT = dict(depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)


def _same_model(spec_path, bank) -> None:
    spec = load_order(spec_path)
    x = torch.randn(2, *bank.data_config["input_size"])
    with torch.inference_mode():
        assert torch.equal(spec.build_model()(x), ordersearch.build_model(bank, spec.order)(x))


def test_specs_rebuild_checkpoint_pretrained_and_file_backed_banks(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    trained = timm.create_model("vit_tiny_patch16_224", **VIT)
    ckpt = tmp_path / "vit.safetensors"
    save_file(trained.state_dict(), str(ckpt))
    # a checkpoint: path and sha256 recorded, the model rebuilt from them
    bank = load_bank("timm:vit_tiny_patch16_224", checkpoint=ckpt, **VIT)
    path = ordersearch.save_order(tmp_path / "ckpt.json", bank, "1-0-1")
    assert json.loads(path.read_text())["bank"]["weights"]["checkpoint"] == str(ckpt)
    _same_model(path, bank)
    # timm's pretrained path (pointed at a local file, as the hub cannot be reached here)
    over = {"pretrained_cfg_overlay": {"file": str(ckpt)}}
    bank = load_bank("timm:vit_tiny_patch16_224", pretrained=True, **VIT, **over)
    path = ordersearch.save_order(tmp_path / "pre.json", bank, "1-1")
    assert json.loads(path.read_text())["bank"]["weights"] == {"pretrained": True, "seed": 0}
    _same_model(path, bank)
    # a saved bank: save() records its path
    saved = load_bank(BANK)
    saved.save(tmp_path / "bank.safetensors")
    assert saved.path == str(tmp_path / "bank.safetensors")
    path = ordersearch.save_order(tmp_path / "file.json", saved, "2-0")
    _same_model(path, saved)
    # a checkpoint changed after the spec was written is refused in one line
    save_file({k: v + 1 for k, v in trained.state_dict().items()}, str(ckpt))
    with pytest.raises(ordersearch.SpecError, match="has changed since the spec was written"):
        load_order(tmp_path / "ckpt.json").build_model()


def test_export_of_a_timm_bank_with_model_args_rebuilds_the_same_model(tmp_path, capsys):
    args = [f"--model-arg={k}={v}" for k, v in VIT.items()]
    out = tmp_path / "run"
    argv = ["search", "--bank", "timm:vit_tiny_patch16_224", *args, "--data", "digits:n=200",
            "--searcher", "random", "--trials", "5", "--reliability-orders", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    exported = tmp_path / "export"
    assert main(["export", "--storage", f"sqlite:///{out / 'study.db'}", "--study", "search-probe-random",
                 "--out", str(exported)]) == 0
    bank = load_bank("timm:vit_tiny_patch16_224", **VIT)
    spec = load_order(exported / "best_order.json")
    assert spec.bank["model_kwargs"] == VIT
    _same_model(exported / "best_order.json", bank)
    capsys.readouterr()
    assert main(["show", str(exported / "best_order.json"), "--rebuild"]) == 0
    shown = capsys.readouterr().out
    assert "matches the bank" in shown and "verdict" in shown
    # show and export take the bank options search takes
    assert main(["show", str(exported / "best_order.json"), "--bank", "timm:vit_tiny_patch16_224", *args]) == 0


def test_a_folder_without_a_test_split_says_so_in_the_report(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 45), ("val", 24)):
        for i in range(n):
            d = tmp_path / "imgs" / split / f"c{i % 3}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((16, 16)) * 80 + 60 * (i % 3)).astype(np.uint8)).save(d / f"{i}.png")
    rc = main(["search", "--bank", "isoresnet:width=8,blocks=3,classes=3", "--data", str(tmp_path / "imgs"),
               "--trials", "4", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    note = "has no test split: no held-out accuracy; the verdict is read on select"
    assert note in capsys.readouterr().out and note in (tmp_path / "out" / "report.md").read_text()
