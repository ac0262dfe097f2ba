from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import ordersearch
from ordersearch import BankError, Order, bank_from_model, build_model, load_bank

# Small random-init configurations of every supported family.
FAMILIES = {
    "isoresnet": ("isoresnet:width=8,blocks=4,classes=10", {}),
    "vit": ("timm:vit_tiny_patch16_224", dict(depth=3, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)),
    "deit_distilled": ("timm:deit_tiny_distilled_patch16_224", dict(depth=3, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)),
    "vit_registers": ("timm:vit_small_patch14_reg4_dinov2", dict(depth=3, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)),
    "test_vit": ("timm:test_vit", dict(img_size=32, num_classes=5)),
    "resmlp": ("timm:resmlp_12_224", dict(img_size=32, num_classes=5)),
    "mixer": ("timm:mixer_s16_224", dict(img_size=32, num_classes=5)),
}


@pytest.fixture(scope="module")
def banks():
    return {name: load_bank(src, **kw) for name, (src, kw) in FAMILIES.items()}


def _convmixer():
    from timm.models.convmixer import ConvMixer

    torch.manual_seed(0)
    return ConvMixer(dim=16, depth=3, kernel_size=3, patch_size=4, num_classes=5).eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_identity_order_reproduces_source_logits(banks, name):
    bank = banks[name]
    x = torch.randn(3, *bank.data_config["input_size"])
    with torch.inference_mode():
        assert torch.allclose(bank(x), bank.model(x), atol=1e-5, rtol=1e-5)
        assert torch.allclose(build_model(bank)(x), bank.model(x), atol=1e-5, rtol=1e-5)


def test_expected_adapters(banks):
    assert {n: b.adapter for n, b in banks.items()} == {
        "isoresnet": "isoresnet", "vit": "vit", "deit_distilled": "vit", "vit_registers": "vit",
        "test_vit": "vit", "resmlp": "mixer", "mixer": "mixer",
    }
    # class + distillation tokens, and class + 4 register tokens, are part of the stem output
    assert banks["deit_distilled"].data_config["block_shape"] == [16 + 2, 32]
    assert banks["vit_registers"].data_config["block_shape"] == [16 + 1 + 4, 32]


def test_convmixer_and_generic_adapter_reproduce_the_model():
    model = _convmixer()
    x = torch.randn(2, 3, 32, 32)
    for adapter in (None, "blocks"):
        bank = bank_from_model(model, adapter=adapter, data_config={"input_size": (3, 32, 32)})
        assert bank.adapter == (adapter or "convmixer")
        with torch.inference_mode():
            assert torch.allclose(bank(x), model(x), atol=1e-6)


def test_generic_adapter_on_a_plain_module_with_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)))

        def forward(self, x):
            return self.blocks(self.inp(x))

    net = Net().eval()
    bank = bank_from_model(net, data_config={"input_size": (6,)})
    assert bank.adapter == "blocks" and bank.head is None and bank.n_blocks == 3
    x = torch.randn(4, 6)
    with torch.inference_mode():
        assert torch.allclose(bank.run_blocks(bank.stem(x), bank.identity), net(x))
        assert bank.embed(x, "2-2").shape == (4, 16)


def test_non_isometric_model_gets_an_error_listing_shapes():
    model = timm.create_model("test_efficientnet", num_classes=3)
    with pytest.raises(BankError, match=r"not isometric.*block 0: \(\d+, \d+, \d+\) -> \(\d+"):
        bank_from_model(model)


def test_model_without_blocks_is_refused():
    with pytest.raises(BankError, match="has no adapter"):
        bank_from_model(nn.Linear(3, 3))


def test_fingerprint_changes_with_any_block_weight(banks):
    bank = load_bank("isoresnet:width=8,blocks=4,classes=10")
    before = bank.fingerprint
    assert before == load_bank("isoresnet:width=8,blocks=4,classes=10").fingerprint  # seeded init
    with torch.no_grad():
        bank.blocks[3].conv2.weight[0, 0, 0, 0] += 1e-3
    assert bank.fingerprint != before
    with torch.no_grad():
        bank.blocks[3].conv2.weight[0, 0, 0, 0] -= 1e-3
    bank.blocks[1].norm1.running_mean += 0.5  # statistics are weights too
    assert bank.fingerprint != before


@pytest.mark.parametrize("name", ["isoresnet", "vit", "mixer"])
def test_save_and_load_round_trip(banks, name, tmp_path):
    bank = banks[name]
    path = bank.save(tmp_path / "bank.safetensors")
    assert (tmp_path / "bank.safetensors.json").exists()
    again = load_bank(path)
    assert again.fingerprint == bank.fingerprint and again.adapter == bank.adapter
    assert again.path == str(path)
    x = torch.randn(2, *bank.data_config["input_size"])
    with torch.inference_mode():
        assert torch.allclose(again(x, "0-0-1"), bank(x, "0-0-1"), atol=1e-6)
    assert load_bank(tmp_path).fingerprint == bank.fingerprint  # the folder works too


def test_saved_bank_keeps_source_orders(tmp_path):
    model = ordersearch.IsoResNet(width=8, blocks=3, classes=10)
    bank = bank_from_model(model, source=model.config.source(), source_orders={"rot": "2-1-0", "inv": [0, 0, 1]})
    again = load_bank(bank.save(tmp_path / "b.safetensors"))
    assert again.source_orders == {"rot": Order([2, 1, 0]), "inv": Order([0, 0, 1])}


def test_bad_bank_files_fail_in_one_line(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BankError, match="does not exist"):
        load_bank(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BankError, match="not a readable safetensors bank"):
        load_bank(junk)
    with pytest.raises(BankError, match="unknown bank source"):
        load_bank("resnet50")
    with pytest.raises(BankError, match="timm has no model 'vit_tinny_patch16_224'; similar: vit_tiny_patch16_224"):
        load_bank("timm:vit_tinny_patch16_224")
    with pytest.raises(BankError, match="unknown setting 'depth=3'"):
        load_bank("isoresnet:width=8,depth=3")


@pytest.mark.parametrize("edit, message", [
    (lambda h: [1, 2], "is a JSON list, not an object"),
    (lambda h: h | {"version": "x"}, "version 'x' is not a positive integer"),
    (lambda h: h | {"version": 0}, "version 0 is not a positive integer"),
    (lambda h: h | {"model_kwargs": [1]}, "'model_kwargs' is a JSON list, expected an object"),
    (lambda h: h | {"source": 3}, "'source' is a JSON int, expected a string"),
    (lambda h: {k: v for k, v in h.items() if k != "source"}, "names no source model"),
])
def test_malformed_bank_headers_fail_in_one_line(tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    model = ordersearch.IsoResNet(width=8, blocks=2, classes=10)
    path = bank_from_model(model, source=model.config.source()).save(tmp_path / "b.safetensors")
    header = ordersearch.adapters.read_bank_header(path)
    save_file(load_file(str(path)), str(path), metadata={"ordersearch": json.dumps(edit(header))})
    with pytest.raises(BankError, match=message):
        load_bank(path)


def test_digest_covers_stem_head_and_data_config_and_an_edited_header_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = ordersearch.IsoResNet(width=8, blocks=2, classes=10)
    bank = bank_from_model(model, source=model.config.source())
    digest, fingerprint = bank.digest, bank.fingerprint
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # not a block: the fingerprint stays, the digest changes
    assert bank.fingerprint == fingerprint and bank.digest != digest
    path = bank.save(tmp_path / "b.safetensors")
    assert load_bank(path).digest == bank.digest
    header = ordersearch.adapters.read_bank_header(path)
    header["data_config"]["mean"] = [0.1]  # an edited preprocessing
    save_file(load_file(str(path)), str(path), metadata={"ordersearch": json.dumps(header)})
    with pytest.raises(BankError, match="do not match the digest"):
        load_bank(path)
    # an explicit override is the user's choice, not an edit: allowed
    assert load_bank(path, data_config={"mean": [0.2]}).data_config["mean"] == [0.2]


def test_in_memory_bank_cannot_be_saved(tmp_path):
    bank = bank_from_model(_convmixer(), data_config={"input_size": (3, 32, 32)})
    with pytest.raises(BankError, match="cannot be rebuilt"):
        bank.save(tmp_path / "b.safetensors")


def test_timm_checkpoint_and_pretrained_file_paths(tmp_path):
    kw = dict(depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)
    torch.manual_seed(3)
    trained = timm.create_model("vit_tiny_patch16_224", **kw)
    ref = load_bank("timm:vit_tiny_patch16_224", seed=0, **kw)
    assert ref.fingerprint != bank_from_model(trained).fingerprint

    # a local checkpoint: torch.save (read with weights_only=True) and safetensors
    pt = tmp_path / "vit.pth"
    torch.save({"state_dict": trained.state_dict()}, pt)
    from safetensors.torch import save_file

    st = tmp_path / "vit.safetensors"
    save_file(trained.state_dict(), str(st))
    want = bank_from_model(trained).fingerprint
    assert load_bank("timm:vit_tiny_patch16_224", checkpoint=pt, **kw).fingerprint == want
    assert load_bank("timm:vit_tiny_patch16_224", checkpoint=st, **kw).fingerprint == want
    # timm's own pretrained path, pointed at a local file instead of the hub
    bank = load_bank("timm:vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(st)}, **kw)
    assert bank.fingerprint == want
    with pytest.raises(BankError, match="does not exist"):
        load_bank("timm:vit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth", **kw)


class _Payload:
    """Unpickling this would run ``os.system``: a checkpoint holding it must be refused, not run."""

    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


@pytest.mark.parametrize("source, kw", [
    ("isoresnet:width=8,blocks=2,classes=10", {}),
    ("timm:vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2)),
])
def test_pickled_checkpoints_are_refused_in_one_line(tmp_path, monkeypatch, recwarn, source, kw):
    import pickle

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "ck.pt"
    bad.write_bytes(pickle.dumps({"model": _Payload()}))
    with pytest.raises(BankError, match="holds pickled objects other than tensors; not loaded") as info:
        load_bank(source, checkpoint=bad, **kw)
    assert "\n" not in str(info.value) and not (tmp_path / "pwned").exists()
    assert not [w for w in recwarn if "pickle" in str(w.message)]


def test_isoresnet_checkpoint_and_data_config(tmp_path):
    model = ordersearch.IsoResNet(width=8, blocks=2, classes=3, in_chans=3, input_size=12)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    bank = load_bank("isoresnet:width=8,blocks=2,classes=3,in_chans=3,input_size=12", checkpoint=tmp_path / "m.pt")
    assert bank.data_config["input_size"] == (3, 12, 12) and bank.num_classes == 3
    assert bank.source == "isoresnet:width=8,blocks=2,classes=3,in_chans=3,input_size=12,bn=1"


def test_timm_data_config_comes_from_timm(banks):
    cfg = banks["deit_distilled"].data_config
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["input_size"]) == (3, 32, 32)  # the size the model was built for


def test_build_model_shares_blocks_and_fine_tunes(banks):
    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    net = build_model(bank, "2-0-2", trainable=True)
    assert net.blocks[0] is bank.blocks[2] and net.blocks[2] is bank.blocks[2]
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    net.train()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert bank.blocks[2].conv1.weight.grad is not None and bank.blocks[1].conv1.weight.grad is None
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    before = bank.blocks[2].conv1.weight.clone()
    opt.step()
    assert not torch.equal(before, bank.blocks[2].conv1.weight)  # shared, not copied
    assert net.features(x).shape == (8, 8)


def test_build_model_validates_order(banks):
    with pytest.raises(ordersearch.OrderError, match="position 1 uses block 9"):
        build_model(banks["isoresnet"], [0, 9])


_VIT = dict(depth=3, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)
_MIXER = dict(img_size=32, num_classes=5)  # these names fix depth and width
# (timm name, small random configuration, adapter): at least 15 names across the families.
TIMM_MODELS = [
    ("vit_tiny_patch16_224", _VIT, "vit"),
    ("deit_tiny_distilled_patch16_224", _VIT, "vit"),
    ("deit3_small_patch16_224", _VIT, "vit"),
    ("vit_small_patch14_reg4_dinov2", _VIT, "vit"),
    ("vit_base_patch16_clip_224", _VIT, "vit"),
    ("vit_base_patch16_siglip_224", _VIT, "vit"),
    ("flexivit_small", _VIT, "vit"),
    ("beit_base_patch16_224", _VIT, "blocks"),
    ("eva02_tiny_patch14_224", _VIT, "eva"),
    ("eva_giant_patch14_224", dict(_VIT, mlp_ratio=2.0), "eva"),
    ("vit_small_patch16_rope_224", _VIT, "eva"),
    ("cait_xxs24_224", _VIT, "cait"),
    ("xcit_nano_12_p16_224", dict(_VIT, patch_size=16), "xcit"),
    ("resmlp_12_224", _MIXER, "mixer"),
    ("mixer_s16_224", _MIXER, "mixer"),
    ("gmlp_ti16_224", _MIXER, "mixer"),
]


@pytest.mark.parametrize("name, kw, adapter", TIMM_MODELS, ids=[n for n, _, _ in TIMM_MODELS])
def test_timm_families_identity_reproduces_logits_and_features(name, kw, adapter):
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    bank = bank_from_model(model)
    assert bank.adapter == adapter and bank.n_blocks == len(model.blocks) >= 3
    x = torch.randn(2, *bank.data_config["input_size"])
    with torch.inference_mode():
        assert torch.allclose(bank(x), model(x), atol=1e-5, rtol=1e-5)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(bank.embed(x), pooled, atol=1e-5, rtol=1e-5)
        assert bank(x, Order([2, 0, 1, 1])).shape == model(x).shape  # reordered, repeated


def test_blocks_whose_arguments_depend_on_depth_are_refused_in_one_short_line():
    model = timm.create_model("vit_small_patch16_rope_mixed_224", **_VIT).eval()  # per-depth RoPE
    with pytest.raises(BankError, match="block 1 gets other arguments than block 0 .rope.*no adapter fits") as info:
        bank_from_model(model)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_a_block_failure_is_named_once_for_all_blocks():
    class Widening(nn.Module):  # its first block widens 4 -> 8: not isometric
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 8), *(nn.Linear(8, 8) for _ in range(11)))

        def forward(self, x):
            return self.blocks(x)

    with pytest.raises(BankError) as info:
        bank_from_model(Widening().eval(), data_config={"input_size": (4,)})
    text = str(info.value)
    assert "block 0: (4,) -> (8,); blocks 1-11: fail on input (4,): RuntimeError" in text
    assert text.count("fail on input") == 1 and len(text) < 300 and "\n" not in text


def test_a_forced_adapter_that_does_not_fit_is_one_line():
    model = timm.create_model("xcit_nano_12_p16_224", **dict(_VIT, patch_size=16)).eval()
    with pytest.raises(BankError, match="adapter 'vit' does not fit Xcit: AttributeError"):
        bank_from_model(model, adapter="vit")


def test_identity_check_compares_pooled_features_under_a_zero_head():
    class TwiceNet(nn.Module):  # doubles after its blocks, where no tail of a bank looks
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(6, 16)
            self.blocks = nn.Sequential(*(nn.Linear(16, 16) for _ in range(2)))
            self.head = nn.Linear(16, 3)
            nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

        def forward_features(self, x):
            return 2 * self.blocks(self.stem(x))

        def forward_head(self, h, pre_logits=False):
            return h if pre_logits else self.head(h)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    with pytest.raises(BankError, match="pooled features differ"):
        bank_from_model(TwiceNet().eval(), data_config={"input_size": (6,)})


def test_offline_pretrained_fails_fast_in_one_line_naming_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BankError, match=r"not in the local Hugging Face cache .* \(--checkpoint FILE") as info:
        load_bank("timm:vit_tiny_patch16_224", pretrained=True)
    assert "\n" not in str(info.value)


def test_pretrained_weights_in_the_local_cache_load_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(3)
    trained = timm.create_model("vit_tiny_patch16_224", depth=2)  # timm's default tag, 2 of its 12 blocks
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(snapshot / "model.safetensors"))
    bank = load_bank("timm:vit_tiny_patch16_224", pretrained=True, depth=2)
    assert torch.equal(bank.blocks[1].attn.qkv.weight, trained.blocks[1].attn.qkv.weight)
