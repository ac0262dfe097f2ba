from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from ordersearch import Order, SpecError, build_model, load_bank, load_order, save_order
from ordersearch.spec import SPEC_VERSION, spec_schema


@pytest.fixture(scope="module")
def bank():
    return load_bank("isoresnet:width=8,blocks=4,classes=10")


def test_round_trip_rebuilds_the_same_function(bank, tmp_path):
    order = Order([3, 1, 1, 0, 2])
    path = save_order(
        tmp_path / "out" / "best.json", bank, order, objective="head", score=0.875,
        metrics={"accuracy": 0.875, "depth": 5}, searcher="random", study="demo",
        data="digits:rotate=30", seed=7,
    )
    spec = load_order(path, bank)
    assert spec.order == order and spec.objective == "head" and spec.score == 0.875
    assert spec.metadata == {"seed": 7} and spec.data == "digits:rotate=30"
    x = torch.randn(4, 1, 16, 16)
    with torch.inference_mode():
        assert torch.equal(spec.build_model(bank)(x), build_model(bank, order)(x))


def test_spec_matches_shipped_schema(bank, tmp_path):
    path = save_order(tmp_path / "s.json", bank, "0-1", score=float("nan"))
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, spec_schema())
    assert doc["version"] == SPEC_VERSION and doc["order_text"] == "0-1" and doc["depth"] == 2
    assert doc["score"] is None  # non-finite scores are stored as null, never as NaN
    assert doc["bank"]["fingerprint"] == bank.fingerprint and doc["bank"]["n_blocks"] == 4


def test_spec_from_saved_bank_rebuilds_without_the_bank(bank, tmp_path):
    saved = load_bank(bank.save(tmp_path / "bank.safetensors"))
    spec_path = save_order(tmp_path / "o.json", saved, "2-2-1")
    spec = load_order(spec_path)
    model = spec.build_model()  # loads the bank from the recorded path
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model(x), build_model(saved, "2-2-1")(x))


def test_spec_for_another_bank_is_refused(bank, tmp_path):
    path = save_order(tmp_path / "s.json", bank, "0-1")
    other = load_bank("isoresnet:width=8,blocks=4,classes=10", seed=1)
    with pytest.raises(SpecError, match="was made for bank .* not this one"):
        load_order(path, other)
    smaller = load_bank("isoresnet:width=8,blocks=3,classes=10")
    with pytest.raises(SpecError, match="made for a bank of 4 blocks, this bank has 3"):
        load_order(path, smaller)


def test_ids_out_of_range_are_refused(bank, tmp_path):
    path = save_order(tmp_path / "s.json", bank, "0-1")
    doc = json.loads(path.read_text())
    doc["order"] = [0, 9]
    path.write_text(json.dumps(doc))
    with pytest.raises(SpecError, match="position 1 uses block 9, but the bank has blocks 0..3"):
        load_order(path)


def test_truncated_and_foreign_files(bank, tmp_path):
    path = save_order(tmp_path / "s.json", bank, "0-1")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(SpecError, match="truncated"):
        load_order(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SpecError, match="not an ordersearch order spec"):
        load_order(path)
    with pytest.raises(SpecError, match="does not exist"):
        load_order(tmp_path / "missing.json")
    path.write_bytes(bytes([0x97, 0xFF, 0x00, 0x12]) * 50)  # random bytes, not UTF-8
    with pytest.raises(SpecError, match="is not text"):
        load_order(path)


def test_newer_schema_version_is_refused(bank, tmp_path):
    path = save_order(tmp_path / "s.json", bank, "0-1")
    doc = json.loads(path.read_text())
    doc["version"] = SPEC_VERSION + 1
    path.write_text(json.dumps(doc))
    with pytest.raises(SpecError, match=f"schema version {SPEC_VERSION + 1}, newer"):
        load_order(path)


def test_messages_are_one_line(bank, tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{")
    with pytest.raises(SpecError) as info:
        load_order(path)
    assert "\n" not in str(info.value)


def test_spec_of_a_timm_bank_rebuilds_with_its_model_arguments(tmp_path):
    kw = dict(depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)
    bank = load_bank("timm:vit_tiny_patch16_224", **kw)
    spec = load_order(save_order(tmp_path / "s.json", bank, "1-1-0"))
    assert spec.bank["model_kwargs"] == kw
    jsonschema.validate(json.loads((tmp_path / "s.json").read_text()), spec_schema())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(spec.build_model()(x), build_model(bank, "1-1-0")(x))
