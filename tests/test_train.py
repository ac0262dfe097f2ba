from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ordersearch import Order, build_model, load_bank, load_order
from ordersearch.adapters.compositional import (
    CompositionalConfig,
    CompositionalNet,
    PositionalIsoBlock,
    parse_compositional_source,
    task_bank,
)
from ordersearch.errors import OrderSearchError
from ordersearch.train import (
    SoftOrderModel,
    TemperatureSchedule,
    TrainConfig,
    finetune_order,
    harden,
    load_train_config,
    mixing_weights,
    train_bank,
)
from ordersearch.train._mixing import WeightMixing

TINY = dict(arch="isoresnet:width=8", n_blocks=3, depth=4, epochs=2, batch_size=32, prune=0.05)
TASKS = ["digits:n=200", "inv=digits:invert,n=200"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_bank(TASKS, out=tmp_path_factory.mktemp("run"), **TINY)


def _randomise_statistics(net: CompositionalNet, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, buf in net.named_buffers():
        if "running_mean" in name:
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
        elif "running_var" in name:
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)


def test_two_task_run_hardens_to_valid_orders_and_writes_outputs(run):
    assert list(run.orders) == ["digits_n_200", "inv"]
    for order in run.orders.values():
        assert 1 <= len(order) <= 4 and all(0 <= i < 3 for i in order)
    for name in ("bank.safetensors", "mixing.npz", "mixing_final.png", "mixing_strip.png", "report.md",
                 "config.json", "history.json", "orders/inv.json"):
        assert (run.out / name).is_file(), name
    weights = np.load(run.out / "mixing.npz")["weights"]
    assert weights.shape == (3, 2, 4, 3)  # (epochs + 1, tasks, positions, blocks)
    assert np.allclose(weights.sum(-1), 1.0, atol=1e-5)
    report = (run.out / "report.md").read_text()
    assert "| inv |" in report and "top weight" in report
    m = run.metrics["inv"]
    assert 0.0 <= m["top_weight"] <= 1.0 and m["order"] == str(run.orders["inv"])
    assert {"soft_test_accuracy", "hardened_test_accuracy", "hardening_cost_test"} <= set(m)
    config = json.loads((run.out / "config.json").read_text())
    assert TrainConfig.from_dict(config) == run.config and config["resolved"]["norm"] == "task"


def test_saved_bank_source_orders_round_trip(run):
    bank = load_bank(run.out / "bank.safetensors")
    assert bank.adapter == "compositional"
    assert bank.source_orders == run.orders and list(bank.source_orders) == list(run.orders)
    header = json.loads((run.out / "bank.safetensors.json").read_text())
    assert header["source_orders"] == {k: v.to_list() for k, v in run.orders.items()}
    spec = load_order(run.out / "orders" / "inv.json", bank)
    assert spec.order == run.orders["inv"] and spec.metadata["task"] == "inv"


def test_per_position_statistics_differ_and_build_model_uses_them(run):
    bank = load_bank(run.out / "bank.safetensors")
    block = bank.blocks[0]
    means = block.norm1.running_mean  # (tasks * depth, C)
    assert means.shape[0] == 2 * 4
    assert not torch.allclose(means[0], means[1])  # task 0, positions 0 and 1
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    order = Order([0, 0, 1, 2])
    with torch.inference_mode():
        got = build_model(bank, order)(x)
        expected = bank.model.run_order(x, order, task=0)
        h = bank.stem(x)
        for k in order:  # every position with position 0's statistics
            h = bank.blocks[k](h, 0)
        shared = bank.head(h)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, shared, atol=1e-4)
    inv = task_bank(bank, "inv")
    with torch.inference_mode():
        assert torch.allclose(build_model(inv, order)(x), bank.model.run_order(x, order, task=1), atol=1e-6)
    assert inv.fingerprint == bank.fingerprint


def test_soft_forward_equals_weighted_sum_of_block_outputs():
    net = CompositionalNet(CompositionalConfig(width=8, blocks=3, depth=4, tasks=2, stems=2, norm="task", skip=True))
    _randomise_statistics(net)
    model = SoftOrderModel(net, mixing="outputs").eval()
    w = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), -1)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        got = model(x, 1, weights=w)
        h = net.stems[1](x)
        for p in range(4):
            h = sum(w[p, k] * net.blocks[k](h, net.slot(1, p)) for k in range(3)) + w[p, 3] * h
        expected = net.heads[0](h)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_weight_mixing_equals_block_with_mixed_parameters(training):
    net = CompositionalNet(CompositionalConfig(width=8, blocks=3, depth=2, affine="slot"))
    _randomise_statistics(net)
    with torch.no_grad():
        for p in net.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = SoftOrderModel(net, mixing="weights")
    mixing = model.mixing
    assert isinstance(mixing, WeightMixing)
    w = torch.tensor([0.2, 0.5, 0.3])
    reference = PositionalIsoBlock(8, slots=2, affine_per_slot=True)
    state = {n: sum(w[k] * dict(net.blocks[k].named_parameters())[n] for k in range(3))
             for n, _ in net.blocks[0].named_parameters()}
    state.update({n: b.clone() for n, b in model.mixed_stats.named_buffers()})
    reference.load_state_dict(state)
    model.train(training)
    reference.train(training)
    h = torch.randn(5, 8, 6, 6)
    with torch.no_grad():
        assert torch.allclose(mixing(net.blocks, h, w, 1), reference(h, 1), atol=1e-5)


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    settings = dict(TINY, epochs=3, harden_epochs=1, gumbel=True, mixing="weights")
    full = train_bank(TASKS, out=tmp_path / "full", **settings)

    class Stop(Exception):
        pass

    def interrupt(stage, done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        train_bank(TASKS, out=tmp_path / "cut", progress=interrupt, **settings)
    assert not (tmp_path / "cut" / "bank.safetensors").exists()
    resumed = train_bank(TASKS, out=tmp_path / "cut", **settings)
    assert resumed.orders == full.orders
    a, b = full.bank.model.state_dict(), resumed.bank.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == full.history
    with pytest.raises(OrderSearchError, match="other settings"):
        train_bank(TASKS, out=tmp_path / "cut", **dict(settings, epochs=4))


def test_fixed_repeating_order_is_a_one_line_config(tmp_path):
    config = TrainConfig.from_dict({"tasks": ["digits:n=200"], "arch": "isoresnet:width=8", "n_blocks": 2,
                                    "order": "0-1-0-1", "epochs": 1})
    assert config.resolved_depth == 4 and config.resolved_norm == "position" and not config.soft
    result = train_bank(config, out=tmp_path)
    bank = result.bank
    assert bank.n_blocks == 2 and bank.source_orders["digits_n_200"] == Order([0, 1, 0, 1])
    assert "(fixed)" in (tmp_path / "report.md").read_text()
    with torch.inference_mode():
        assert build_model(bank, "0-1-0-1")(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("tasks:\n  - digits\n  - {name: rot, data: 'digits:rotate=30'}\nhead: shared\n"
                    "temperature: {start: 2.0, end: 0.05, shape: cosine}\n")
    config = load_train_config(path, ["epochs=3", "temperature.end=0.02", "mixing=weights", "depth=6"])
    assert [t.name for t in config.tasks] == ["digits", "rot"] and config.tasks[1].data == "digits:rotate=30"
    assert config.head == "shared" and config.epochs == 3 and config.mixing == "weights"
    assert config.temperature == TemperatureSchedule(2.0, 0.02, "cosine") and config.resolved_depth == 6
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(OrderSearchError, match="unknown"):
        load_train_config(path, ["epoch=3"])
    with pytest.raises(OrderSearchError, match="mixing"):
        load_train_config(path, ["mixing=both"])


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_temperature_schedules_reach_the_end(shape):
    s = TemperatureSchedule(1.0, 0.01, shape)
    values = [s(i / 10) for i in range(11)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_low_temperature_pruning_and_hardening():
    logits = torch.tensor([[0.0, 0.3, 0.1, 0.0], [0.2, 0.0, 0.0, 0.5]])
    soft = mixing_weights(logits, 1.0)
    hard = mixing_weights(logits, 0.01)
    assert soft.max(-1).values.mean() < 0.4 and hard.max(-1).values.mean() > 0.99
    pruned = mixing_weights(logits, 0.2, prune=0.2)
    assert torch.allclose(pruned.sum(-1), torch.ones(2)) and (pruned == 0).any()
    assert harden(soft, n_blocks=3) == Order([1])  # position 1 picks "skip" (index 3)


def test_compositional_source_round_trip():
    config = CompositionalConfig(width=8, blocks=3, depth=6, tasks=2, classes=(10, 5), stems=2, norm="task", skip=True)
    assert parse_compositional_source(config.source()) == config
    bank = load_bank(config.source())
    assert bank.n_blocks == 3 and bank.num_classes == 10


def test_finetune_order_from_a_spec(run, tmp_path):
    bank = load_bank(run.out / "bank.safetensors")
    before = bank.fingerprint
    spec_path = run.out / "orders" / "digits_n_200.json"
    result = finetune_order(spec_path, "digits:rotate=30,n=200", bank=bank, epochs=1, train="all")
    assert result.start == run.orders["digits_n_200"]
    assert all(0 <= i < 3 for i in result.order) and result.weights.shape[0] == 2
    assert bank.fingerprint == before  # "all" trains a copy
    with torch.inference_mode():
        assert result.model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    out = train_bank(["rot=digits:rotate=30,n=200"], warm_start=str(spec_path), epochs=1, out=tmp_path)
    assert (tmp_path / "orders" / "rot.json").is_file() and "rot" in out.orders


def test_the_config_format_in_train_help_is_valid_and_unknown_keys_are_refused(tmp_path, capsys):
    from ordersearch.cli import _train_config_help
    from ordersearch.train import load_train_config

    text = _train_config_help()
    example = "\n".join(line[2:] for line in text.splitlines() if line.startswith("  "))
    (tmp_path / "c.yaml").write_text(example)
    config = load_train_config(tmp_path / "c.yaml")
    assert [t.name for t in config.tasks] == ["digits", "rot"] and config.depth == 6 and config.threads == 1
    (tmp_path / "bad.yaml").write_text(example + "\ndepht: 3\n")
    with pytest.raises(OrderSearchError, match="'depht': did you mean 'depth'"):
        load_train_config(tmp_path / "bad.yaml")


def test_a_search_job_measures_gains_against_a_named_source_order(run):
    """With a multi-source bank the identity is an order no task ran: the baseline can be a
    source order, judged with target statistics, and the unmodified model it reports is that
    order with its own task's statistics."""
    from ordersearch import EngineConfig, SearchJob, SelectionConfig
    from ordersearch.data import load
    from ordersearch.engine import Engine, get_objective
    from ordersearch.search import SearchError, held_out

    bank = load_bank(run.files["bank"])
    data = load("digits:invert,rotate=20,n=300", bank.data_config)
    job = SearchJob(bank=bank, data=data, objective="infomax", searcher="random", n_trials=5,
                    engine=EngineConfig(norm="target"), selection=SelectionConfig(reliability_orders=0),
                    baseline="inv")
    result = job.run()
    inv = bank.source_orders["inv"]
    assert result.baseline.order == inv and result.baseline.baseline
    assert result.baseline_name == "source order 'inv' (target statistics)"
    assert inv in [f.order for f in result.finalists] and result.settings["baseline"] == str(inv)
    if result.chosen.order != inv:
        assert "over the source order 'inv' (target statistics)" in result.summary()
    splits = job.splits()
    test_es = held_out(get_objective("head"), splits.search, splits.test)
    own = Engine(task_bank(bank, "inv"), test_es, "head", norm="source").evaluate([inv])[0].value
    task0 = Engine(bank, test_es, "head", norm="source").evaluate([inv])[0].value
    assert result.reference == pytest.approx(own)
    assert own != task0  # the task-0 statistics would have reported another model
    with pytest.raises(SearchError, match="baseline 'nope' is neither a source order nor a valid order.*inv"):
        SearchJob(bank=bank, data=data, objective="infomax", baseline="nope")
    assert SearchJob(bank=bank, data=data, baseline="2-1").baseline_order()[1] == "order 2-1"


# --- ViT blocks (timm's Block) --------------------------------------------------------------
VIT = dict(arch="timm:vit_tiny_patch16_224,width=24", n_blocks=2, depth=3, epochs=1, batch_size=32,
           stem="shared", head="shared", mixing="weights", prune=0.05, lr=2e-3)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return train_bank(["digits:n=150", "inv=digits:invert,n=150"], out=tmp_path_factory.mktemp("vit"), **VIT)


def test_a_vit_bank_is_trained_from_timm_blocks_and_its_saved_orders_run_in_the_engine(vit_run):
    from timm.models.vision_transformer import Block

    from ordersearch import Engine
    from ordersearch.data import load

    assert vit_run.config.resolved_norm == "shared"  # LayerNorm: no statistics slots
    bank = load_bank(vit_run.out / "bank.safetensors")
    c = bank.model.config
    assert (c.family, c.width, c.heads, c.patch, c.mlp_ratio) == ("vit", 24, 3, 4, 4.0)  # vit_tiny's heads, ratio
    assert all(isinstance(b.block, Block) for b in bank.blocks) and not bank.has_positional_blocks
    assert bank.source_orders == vit_run.orders
    data = load("digits:invert,n=150", bank.data_config, seed=0)
    x, y = data.split("test")
    order = vit_run.orders["inv"]
    with torch.inference_mode():
        direct = bank.model.run_order(x, order, task=0)
        assert torch.allclose(build_model(bank, order)(x), direct, atol=1e-5)
    accuracy = int((direct.argmax(1) == y).sum()) / len(y)
    assert accuracy == pytest.approx(vit_run.metrics["inv"]["final_test_accuracy"], abs=1e-9)
    from ordersearch.evalset import EvalSet

    scores = Engine(bank, EvalSet(x, y), "head", norm="source").evaluate([order, bank.identity])
    assert scores[0].value == pytest.approx(accuracy, abs=1e-9)
    # target statistics have nothing to re-estimate in LayerNorm blocks: the same scores
    again = Engine(bank, EvalSet(x, y), "head", norm="target").evaluate([order])
    assert again[0].value == pytest.approx(accuracy, abs=1e-9)
    from ordersearch import EngineConfig, SearchJob, SelectionConfig

    result = SearchJob(bank=bank, data=data, objective="infomax", searcher="sources", n_trials=3, baseline="inv",
                       engine=EngineConfig(norm="target"), selection=SelectionConfig(reliability_orders=0)).run()
    assert result.baseline_name == "source order 'inv'"  # not "(target statistics)": there are none
    assert any("no BatchNorm" in n for n in result.notes)


def test_weight_mixing_of_vit_blocks_equals_one_block_with_mixed_parameters():
    from ordersearch.adapters.compositional import VitBlock

    net = CompositionalNet(CompositionalConfig(width=12, heads=2, blocks=3, depth=2, family="vit", norm="shared"))
    with torch.no_grad():
        for p in net.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = SoftOrderModel(net, mixing="weights")
    w = torch.tensor([0.2, 0.5, 0.3])
    reference = VitBlock(12, 2)
    reference.load_state_dict({n: sum(w[k] * dict(net.blocks[k].named_parameters())[n] for k in range(3))
                               for n, _ in net.blocks[0].named_parameters()})
    h = torch.randn(5, 17, 12)
    with torch.no_grad():
        assert torch.allclose(model.mixing(net.blocks, h, w, 1), reference(h), atol=1e-5)
        assert net.run_order(torch.randn(2, 1, 16, 16), [2, 0, 0]).shape == (2, 10)
    config = net.config
    assert parse_compositional_source(config.source()) == config
    assert "family" not in CompositionalConfig().source()  # isoresnet banks keep their source text


@pytest.mark.parametrize("settings, message", [
    ({"arch": "vit:width=10,heads=3"}, "not a multiple of heads"),
    ({"arch": "timm:resnet18"}, "could not build 'resnet18' as a Vision Transformer"),
    ({"arch": "timm:no_such_model"}, "could not build 'no_such_model'"),
    ({"arch": "timm:"}, "name a timm ViT"),
    ({"arch": "vit:depth=3"}, "unknown setting"),
    ({"arch": "convnext"}, "expected isoresnet"),
    ({"arch": "vit", "norm": "task"}, "keep no running statistics"),
])
def test_bad_block_architectures_are_refused_before_any_training(settings, message):
    with pytest.raises(OrderSearchError, match=message):
        TrainConfig.from_dict({"tasks": ["digits:n=100"], **settings})


def test_warmup_raises_the_block_learning_rate_linearly_then_decays_it(tmp_path):
    from ordersearch.train._multitask import _lr_factor, _Run

    assert [round(_lr_factor(s, total=10**6, warmup=4), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert _lr_factor(5, total=100, warmup=4) == _lr_factor(5, total=100)  # after warm-up: the cosine
    assert _lr_factor(0, total=100) == 1.0 and _lr_factor(100, total=100) == 0.0
    with pytest.raises(OrderSearchError, match="warmup_epochs"):
        TrainConfig.from_dict({"tasks": ["digits"], "warmup_epochs": -1})
    config = TrainConfig.from_dict({"tasks": TASKS, **TINY, "warmup_epochs": 2, "lr": 0.01, "order_lr": 0.05})
    run = _Run(config, tmp_path, None)
    run._setup()
    steps = math.ceil(120 / 32)  # 60% of 200 images train, in batches of 32
    blocks, orders = run.sched.get_last_lr()
    assert blocks == pytest.approx(0.01 / (2 * steps)) and orders == pytest.approx(0.05)  # logits: no warm-up
