"""ordersearch.data: digits domains, splits, specs, image folders and tensor files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ordersearch.data import (
    SHIFTS,
    WORK_SIZE,
    Data,
    _files,
    apply_shifts,
    describe_shifts,
    digits_images,
    load,
    parse_spec,
)
from ordersearch.errors import DataError
from ordersearch.evalset import EvalSet

# mean 0, std 1 at the working size: load returns the shifted images themselves, in [0, 1]
RAW32 = {"input_size": (1, WORK_SIZE, WORK_SIZE), "mean": 0.0, "std": 1.0}
RGB32 = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

# a value for each shift that should visibly change a digit
STRONG = {
    "rotate": 40, "scale": 1.5, "shiftx": 0.2, "shifty": -0.2, "invert": 1, "contrast": 0.5,
    "noise": 0.2, "blur": 1.5, "thicken": 1, "thin": 1,
}


def _all(data: Data) -> torch.Tensor:
    return torch.cat([data.train[0], data.val[0], data.test[0]])


# --- digits, splits --------------------------------------------------------------------------
def test_digits_splits_sizes_and_stratified():
    data = load("digits")
    sizes = data.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1078, "val": 360, "test": 359}
    assert data.classes == tuple(str(i) for i in range(10))
    assert data.input_size == (1, 16, 16)  # the default data config
    for c in range(10):
        n_c = [int((data.split(s)[1] == c).sum()) for s in ("train", "val", "test")]
        assert abs(n_c[0] / sum(n_c) - 0.6) < 0.02 and abs(n_c[1] / sum(n_c) - 0.2) < 0.02
    idx = torch.cat(list(data.index.values()))
    assert torch.equal(idx.sort().values, torch.arange(1797))  # disjoint and complete


def test_bundled_digits_are_sklearns():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y, _ = digits_images(8)
    np.testing.assert_allclose(x.squeeze(1).numpy() * 16, d.images, atol=1e-5)
    assert (y.numpy() == d.target).all()


def test_splits_identical_across_shifts():
    plain = load("digits", RAW32)
    for spec in ("digits:rotate=40", "digits:noise=0.3,blur=1", "digits:invert"):
        shifted = load(spec, RAW32)
        for s in ("train", "val", "test"):
            assert torch.equal(plain.index[s], shifted.index[s])
            assert torch.equal(plain.split(s)[1], shifted.split(s)[1])
    # pairing holds image by image: inversion of the same digit
    inverted = load("digits:invert", RAW32)
    torch.testing.assert_close(inverted.val[0], 1 - plain.val[0])


def test_split_seed_changes_split_not_domain():
    a, b = load("digits", seed=0), load("digits", seed=1)
    assert not torch.equal(a.index["val"], b.index["val"])
    assert a.sizes() == b.sizes()


def test_noise_is_seeded():
    a = load("digits:noise=0.2", RAW32, seed=0)
    b = load("digits:noise=0.2", RAW32, seed=0)
    assert torch.equal(a.train[0], b.train[0])
    assert a.spec == "digits:noise=0.2,seed=0"
    # the spec's seed changes the noise but not the split (that is load's seed)
    c = load("digits:noise=0.2,seed=1", RAW32, seed=0)
    assert torch.equal(a.index["train"], c.index["train"])
    assert not torch.allclose(a.train[0], c.train[0])
    # the canonical spec reloads the same data
    assert torch.equal(load(a.spec, RAW32, seed=0).train[0], a.train[0])


# --- shifts ---------------------------------------------------------------------------------
def test_required_shifts_registered_and_listed():
    for name in ("rotate", "invert", "noise", "blur", "scale", "thicken", "thin"):
        assert name in SHIFTS
    listing = describe_shifts()
    assert all(name in listing for name in SHIFTS)
    assert set(STRONG) == set(SHIFTS)  # a new shift must be added to the tests below


@pytest.mark.parametrize("name", sorted(STRONG))
def test_each_shift_changes_images_and_keeps_range(name):
    plain = load("digits", RAW32)
    shifted = load(f"digits:{name}={STRONG[name]}", RAW32)
    x = _all(shifted)
    assert x.min() >= 0 and x.max() <= 1
    assert (x - _all(plain)).abs().mean() > 0.02


@pytest.mark.parametrize("name", sorted(STRONG))
def test_identity_value_is_identity(name):
    x, _, _ = digits_images()
    shift = SHIFTS[name]
    assert shift.identity is not None
    torch.testing.assert_close(apply_shifts(x[:50], [(name, shift.identity)]), x[:50], atol=1e-5, rtol=0)


def test_rotate_direction_and_invert_values():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 7] = 1  # right of the centre
    rotated = apply_shifts(x, "rotate=90")
    assert rotated[0, 0, 1, 4] > 0.99  # counter-clockwise: now above the centre
    torch.testing.assert_close(apply_shifts(torch.full((1, 4, 4), 0.25), "invert"), torch.full((1, 4, 4), 0.75))


def test_thicken_adds_ink_and_thin_removes_it():
    x, _, _ = digits_images()
    ink = x.sum()
    assert apply_shifts(x, "thicken=1").sum() > 1.2 * ink
    assert apply_shifts(x, "thin=1").sum() < 0.8 * ink
    # fractional strengths lie between whole ones
    assert apply_shifts(x, "thicken=1").sum() < apply_shifts(x, "thicken=1.5").sum() < apply_shifts(x, "thicken=2").sum()


def test_composition_is_ordered_and_equals_sequential_application():
    x, _, _ = digits_images()
    x = x[:100]
    rb = apply_shifts(x, "rotate=30,blur=1.5")
    br = apply_shifts(x, "blur=1.5,rotate=30")
    assert (rb - br).abs().max() > 0.05  # order matters
    torch.testing.assert_close(rb, apply_shifts(apply_shifts(x, "rotate=30"), "blur=1.5"))
    # random shifts draw from one generator, in order
    g = torch.Generator().manual_seed(3)
    by_hand = SHIFTS["noise"](SHIFTS["rotate"](x, 30, g), 0.3, g)
    torch.testing.assert_close(apply_shifts(x, "rotate=30,noise=0.3", seed=3), by_hand)


def test_load_equals_shifts_on_digits():
    data = load("digits:rotate=25,noise=0.3", RAW32, seed=5)
    x, _, _ = digits_images()
    ref = apply_shifts(x, "rotate=25,noise=0.3", seed=5)
    torch.testing.assert_close(data.test[0], ref[data.index["test"]])


def test_shifted_load_is_fast():
    load("digits:rotate=30,noise=0.2")  # warm: reads the digits once
    start = time.perf_counter()
    load("digits:rotate=30,noise=0.2")
    load("digits:rotate=30,noise=0.2", RGB32)
    assert time.perf_counter() - start < 1.0


# --- resizing and normalisation -------------------------------------------------------------
def test_normalisation_uses_data_config():
    raw = load("digits:rotate=10", {"input_size": (3, 24, 24), "mean": 0.0, "std": 1.0})
    data = load("digits:rotate=10", {"input_size": (3, 24, 24), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 2.0)})
    assert data.input_size == (3, 24, 24)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(data.val[0], (raw.val[0] - mean) / std)
    # grey replicated to three channels
    torch.testing.assert_close(raw.val[0][:, 0], raw.val[0][:, 2])
    assert data.description["data_config"]["mean"] == [0.1, 0.2, 0.3]


# --- class subsets and n --------------------------------------------------------------------
def test_class_range_keeps_and_remaps_labels():
    full = load("digits")
    sub = load("digits:classes=5-9")
    assert sub.classes == ("5", "6", "7", "8", "9")
    assert sub.spec == "digits:classes=5-9"
    for s in ("train", "val", "test"):
        x, y = full.split(s)
        keep = y >= 5
        assert torch.equal(sub.split(s)[1], y[keep] - 5)
        assert torch.equal(sub.split(s)[0], x[keep])


def test_class_list():
    sub = load("digits:classes=0,2,4,rotate=10")
    assert sub.classes == ("0", "2", "4")
    assert set(sub.train[1].tolist()) == {0, 1, 2}
    assert sub.spec == "digits:rotate=10,classes=0,2,4"
    assert parse_spec("digits:classes=0,2,4,invert").shifts == (("invert", 1.0),)


def test_n_keeps_exactly_n_stratified_and_shift_independent():
    a = load("digits:n=500")
    b = load("digits:n=500,rotate=20")
    assert sum(a.sizes().values()) == 500
    assert a.sizes() == {"train": 300, "val": 100, "test": 100}
    assert torch.equal(a.index["val"], b.index["val"])
    counts = torch.bincount(a.train[1], minlength=10)
    assert counts.min() >= 28 and counts.max() <= 32


# --- specs and errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["digits", "digits:rotate=25,noise=0.3", "digits:blur=1,rotate=-10", "digits:classes=0,2,4,n=100",
     "digits:split=70/15/15", "digits:invert,thin=0.5", "data/x.npz:norm=none", "some/folder:classes=cat,dog"],
)
def test_canonical_spec_round_trips(text):
    spec = parse_spec(text)
    assert parse_spec(str(spec)) == spec


def test_spec_kinds():
    assert parse_spec("Digits:rotate=5").kind == "digits"
    assert parse_spec("a/b.npz").kind == "tensors"
    assert parse_spec("a/b.pt:n=10").source == "a/b.pt"
    assert parse_spec("photos").kind == "folder"
    assert str(parse_spec("digits:split=60/20/20")) == "digits"  # the default is not written


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("digits:rotat=3", "shifts: rotate"),
        ("digits:rotate=abc", "not a number"),
        ("digits:rotate=1000", "-360..360"),
        ("digits:noise=-1", "0..1"),
        ("digits:rotate", "needs a value"),
        ("digits:classes=12", "classes are 0, 1"),
        ("digits:n=5000", "only 1797"),
        ("digits:n=1,n=2", "twice"),
        ("digits:split=1/2", "e.g. split=60/20/20"),
        ("digits:norm=none", "tensor files only"),
        ("does/not/exist", "no such file or folder"),
        ("missing.npz", "no such file or folder"),
        ("", "empty data spec"),
    ],
)
def test_bad_specs_raise_data_error(text, fragment):
    with pytest.raises(DataError) as info:
        load(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [({"input_size": (16, 16)}, "(C, H, W)"), ({"input_size": (3, 8, 8), "mean": (0.5, 0.5)}, "2 values"),
     ({"input_size": (1, 8, 8), "std": 0}, "positive")],
)
def test_bad_data_config(config, fragment):
    with pytest.raises(DataError) as info:
        load("digits", config)
    assert fragment in str(info.value)


# --- image folders --------------------------------------------------------------------------
def _write_pngs(root: Path, counts: dict[str, int], *, size=(20, 24), start=0) -> None:
    x, y, _ = digits_images()
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (x[(y == int(c[-1])).nonzero()[start + i, 0], 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(img).resize(size).convert("RGB").save(root / c / f"{i}.png")


def test_image_folder_split_by_seed(tmp_path):
    _write_pngs(tmp_path, {"c0": 10, "c1": 10, "c7": 5})
    data = load(str(tmp_path), RGB32)
    assert data.classes == ("c0", "c1", "c7")
    assert data.sizes() == {"train": 15, "val": 5, "test": 5}
    assert data.input_size == (3, 32, 32)
    mean = torch.tensor(RGB32["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(RGB32["std"]).view(1, 3, 1, 1)
    raw = _all(data) * std + mean
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5 and raw.max() > 0.5
    assert data.description["source"] == "imagefolder"
    assert json.loads(json.dumps(data.description))["sizes"] == data.sizes()
    # the spec options work on folders too
    sub = load(f"{tmp_path}:classes=c7,rotate=90", RGB32)
    assert sub.classes == ("c7",) and sum(sub.sizes().values()) == 5


def test_image_folder_presplit(tmp_path):
    _write_pngs(tmp_path / "train", {"a1": 4, "b2": 3})
    _write_pngs(tmp_path / "val", {"b2": 2}, start=5)
    data = load(str(tmp_path), RGB32)
    assert data.classes == ("a1", "b2")
    assert data.sizes() == {"train": 7, "val": 2, "test": 0}
    assert data.val[1].tolist() == [1, 1]  # val's only class keeps its index in the union
    with pytest.raises(DataError, match="empty"):
        data.loader("test")
    with pytest.raises(DataError, match="split="):
        load(f"{tmp_path}:split=50/25/25", RGB32)


def test_image_folder_normalises_known_pixels(tmp_path):
    (tmp_path / "grey").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (51, 102, 204)).save(tmp_path / "grey" / f"{i}.png")
    cfg = {"input_size": (3, 16, 16), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "crop_pct": 0.875}
    x = _all(load(str(tmp_path), cfg))
    expected = (torch.tensor([0.2, 0.4, 0.8]) - torch.tensor([0.1, 0.2, 0.3])) / 0.5
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand_as(x), atol=1e-5, rtol=0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder"):
        load(str(tmp_path))  # no class folders
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load(str(tmp_path))


# --- folders streamed to disk --------------------------------------------------------------
def test_a_streamed_folder_is_the_folder_loaded_in_memory(tmp_path, mapped_file):
    _write_pngs(tmp_path / "f", {"c0": 12, "c1": 12, "c7": 6})
    _write_pngs(tmp_path / "pre" / "train", {"a1": 4, "b2": 3})
    _write_pngs(tmp_path / "pre" / "val", {"b2": 2}, start=5)  # and no test split
    for spec in (str(tmp_path / "f"), f"{tmp_path / 'f'}:classes=c0,c7,rotate=90,n=14", str(tmp_path / "pre")):
        whole = load(spec, RGB32, seed=3, stream=False)
        streamed = load(spec, RGB32, seed=3, stream=True)
        for name in ("train", "val", "test"):
            (xw, yw), (xs, ys) = whole.split(name), streamed.split(name)
            assert torch.equal(xw, xs) and torch.equal(yw, ys) and torch.equal(whole.index[name], streamed.index[name])
            if len(xs):
                assert mapped_file(xs).startswith(os.environ["ORDERSEARCH_CACHE"])  # on disk, not in memory
        assert streamed.spec == whole.spec and streamed.description["streamed"] is True


def test_a_streamed_folder_is_reused_and_resumed_after_a_kill(tmp_path, monkeypatch):
    from ordersearch.data import _stream

    _write_pngs(tmp_path / "f", {"c0": 10, "c1": 10})
    whole = load(str(tmp_path / "f"), RGB32, stream=False)
    monkeypatch.setattr(_stream, "_CHUNK", 4)
    decoded: list[int] = []
    real = _files._Decoder.__call__
    monkeypatch.setattr(_files._Decoder, "__call__", lambda self, idx: decoded.append(len(idx)) or real(self, idx))
    seen: list[int] = []

    def killed(stage, done, total):
        seen.append(done)
        if done >= 8:
            raise KeyboardInterrupt  # as a Ctrl-C after two chunks

    with pytest.raises(KeyboardInterrupt):
        load(str(tmp_path / "f"), RGB32, stream=True, progress=killed)
    assert seen == [4, 8] and sum(decoded) == 1 + 8  # one image to learn the shape, two chunks
    decoded.clear()
    resumed = load(str(tmp_path / "f"), RGB32, stream=True)
    assert sum(decoded) == 1 + 20 - 8  # the rest only
    assert all(torch.equal(a, b) for a, b in zip(_all(whole), _all(resumed)))
    decoded.clear()
    again = load(str(tmp_path / "f"), RGB32, stream=True)
    assert decoded == [] and torch.equal(_all(again), _all(whole))  # found, nothing decoded
    # a changed file is a new dataset
    _write_pngs(tmp_path / "f", {"c1": 1}, start=30)
    load(str(tmp_path / "f"), RGB32, stream=True)
    assert sum(decoded) == 1 + 20


def test_streaming_says_what_it_cannot_do(tmp_path):
    _write_pngs(tmp_path / "f", {"c0": 6, "c1": 6})
    with pytest.raises(DataError, match="random shifts"):
        load(f"{tmp_path / 'f'}:noise=0.1", RGB32, stream=True)
    with pytest.raises(DataError, match="streams image folders"):
        load("digits", RGB32, stream=True)
    assert load(f"{tmp_path / 'f'}:noise=0.1", RGB32).description.get("streamed") is None  # small: in memory


def test_large_derived_image_sets_stay_on_disk(monkeypatch, mapped_file):
    from ordersearch import _images

    es = EvalSet(torch.randn(300, 3, 8, 8), torch.arange(300) % 3)
    small = es.subset(100)
    assert mapped_file(small.x) is None
    monkeypatch.setattr(_images, "IN_MEMORY_BYTES", 10_000)
    big = es.subset(100)
    assert torch.equal(big.x, small.x) and "(deleted)" in mapped_file(big.x)  # an unlinked temporary file
    assert not list((Path(os.environ["ORDERSEARCH_CACHE"]) / "tmp").iterdir())  # nothing left behind
    joined = _images.gather([(es.x, torch.tensor([5, 1])), (small.x, None)])
    assert torch.equal(joined, torch.cat([es.x[[5, 1]], small.x]))


# --- tensor files ---------------------------------------------------------------------------
def test_npz_file_uint8(tmp_path):
    x, y, _ = digits_images(8)
    x8 = (x[:60, 0] * 255).round().to(torch.uint8).numpy()  # (N, H, W) uint8
    np.savez(tmp_path / "d.npz", x=x8, y=y[:60].numpy())
    data = load(tmp_path / "d.npz", RGB32)  # a Path works too
    assert data.input_size == (3, 32, 32) and sum(data.sizes().values()) == 60
    assert data.classes == tuple(str(i) for i in range(10))
    assert torch.equal(torch.cat([data.split(s)[1] for s in ("train", "val", "test")]).sort().values,
                       y[:60].sort().values)
    assert data.description["source"] == "tensors"


def test_pt_file_presplit_with_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    obj = {
        "x_train": torch.rand(20, 1, 8, 8, generator=g), "y_train": torch.arange(20) % 2,
        "x_val": torch.rand(6, 1, 8, 8, generator=g), "y_val": torch.arange(6) % 2,
        "classes": ["cat", "dog"],
    }
    torch.save(obj, tmp_path / "d.pt")
    data = load(str(tmp_path / "d.pt"), {"input_size": (1, 8, 8), "mean": 0.5, "std": 0.5})
    assert data.classes == ("cat", "dog")
    assert data.sizes() == {"train": 20, "val": 6, "test": 0}
    torch.testing.assert_close(data.val[0], (obj["x_val"] - 0.5) / 0.5)
    assert load(str(tmp_path / "d.pt") + ":classes=dog").sizes() == {"train": 10, "val": 3, "test": 0}


def test_unlabelled_tensor_file_and_norm_none(tmp_path):
    x = torch.randn(30, 3, 32, 32)  # already normalised for the bank
    torch.save({"x": x}, tmp_path / "u.pt")
    with pytest.raises(DataError, match="norm=none"):
        load(str(tmp_path / "u.pt"), RGB32)
    data = load(str(tmp_path / "u.pt") + ":norm=none", RGB32)
    assert not data.has_labels and data.classes == () and data.train[1] is None
    torch.testing.assert_close(_all(data).sort(0).values, x.sort(0).values)  # untouched
    es = data.evalset("train")
    assert not es.has_labels
    (batch,) = next(iter(data.loader("train", batch_size=4)))
    assert batch.shape == (4, 3, 32, 32)


def test_bad_tensor_files(tmp_path):
    np.savez(tmp_path / "nox.npz", images=np.zeros((3, 8, 8)))
    with pytest.raises(DataError, match="expected key x"):
        load(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "bady.npz", x=np.zeros((3, 8, 8), np.uint8), y=np.zeros(4))
    with pytest.raises(DataError, match=r"expected \(3,\)"):
        load(str(tmp_path / "bady.npz"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read"):
        load(str(tmp_path / "junk.pt"))


# --- EvalSet and loaders --------------------------------------------------------------------
def test_evalset_from_split():
    data = load("digits:rotate=30")
    es = data.evalset("val", val_fraction=0.3, seed=2)
    assert isinstance(es, EvalSet)
    assert torch.equal(es.x, data.val[0]) and torch.equal(es.y, data.val[1])
    assert es.classes == data.classes and es.num_classes == 10
    assert es.name == "digits:rotate=30[val]"
    assert 0.25 < len(es.val_idx) / len(es) < 0.35
    assert not data.evalset("test", labelled=False).has_labels
    assert len(data.evalset("train+val")) == data.sizes()["train"] + data.sizes()["val"]
    with pytest.raises(DataError, match="unknown split"):
        data.evalset("dev")


def test_loader_is_seeded():
    data = load("digits:n=100")
    first = [y for _, y in data.loader("train", batch_size=16, shuffle=True, seed=1)]
    again = [y for _, y in data.loader("train", batch_size=16, shuffle=True, seed=1)]
    other = [y for _, y in data.loader("train", batch_size=16, shuffle=True, seed=2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert torch.equal(torch.cat(first).sort().values, data.train[1].sort().values)
