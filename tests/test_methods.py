"""Every method on a tiny BERT: a real ClientApp round trip carries exactly its trainable tensors,
Flower's FedAvg aggregates them, and the server-side loss on a learnable toy task goes down."""

from __future__ import annotations

import pytest
import torch
from conftest import write_toy_csv
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from federa_app.config import METHODS, parse_run_config
from federa_app.data import loading
from federa_app.federation.client import handle_train
from federa_app.federation.wire import INIT_FACTORS_KEY
from federa_app.method.models import (
    build_model,
    initial_factors,
    load_base_model,
    load_tokenizer,
    load_trainable_state,
    trainable_state,
)
from federa_app.method.training import evaluate


def _expected_names(method: str, names: set[str]) -> set[str]:
    """Which parameter names a method trains, stated independently of models.py."""
    head = {n for n in names if "classifier" in n and "original_module" not in n}
    rules = {
        "fft": lambda n: True,
        "bitfit": lambda n: n.endswith("bias"),
        "adapter": lambda n: ".adapter." in n,
        "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
        "federa": lambda n: ".lora_A." in n or ".lora_B." in n,
        "ffa-lora": lambda n: ".lora_B." in n,
        "federa-ffa": lambda n: ".lora_B." in n,
    }
    return head | {n for n in names if rules[method](n)}


@pytest.mark.parametrize("method", METHODS)
def test_method_round_trip_carries_its_tensors_and_learns(
    tmp_path, tiny_bert, server_identity, method
):
    csv = write_toy_csv(tmp_path / "toy.csv", rows=400)
    run_config = {
        "model": str(tiny_bert), "dataset": f"csv:{csv}", "method": method, "partitioner": "iid",
        "lora-rank": 4, "lora-alpha": 8, "adapter-size": 8, "local-steps": 30,
        "batch-size": 16, "learning-rate": 0.01,
    }  # fmt: skip
    cfg = parse_run_config(run_config)
    train, test, labels = loading.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    factors = initial_factors(cfg, str(tiny_bert), labels) if cfg.uses_svd_init else None
    server_model = build_model(cfg, str(tiny_bert), labels, factors)
    global_state = trainable_state(server_model)
    all_names = {n for n, _ in server_model.named_parameters()}
    assert set(global_state) == _expected_names(method, all_names)
    test_loader = loading.make_loader(test, load_tokenizer(str(tiny_bert)), 64, 64, False, 0)
    losses = [evaluate(server_model, test_loader, len(labels))["loss"]]

    nodes = {
        node: Context(1, node, {"partition-id": i, "num-partitions": 2}, RecordDict(), run_config)
        for i, node in enumerate((11, 12))
    }
    for server_round in (1, 2, 3):
        replies = []
        for node, context in nodes.items():
            content = RecordDict(
                {
                    "arrays": ArrayRecord(global_state),
                    "config": ConfigRecord({"server-round": server_round}),
                }
            )
            if factors is not None and server_round == 1:  # once per node, as WireRecorder does
                content[INIT_FACTORS_KEY] = ArrayRecord(factors)
            reply = handle_train(Message(content, dst_node_id=node, message_type="train"), context)
            sent_back = reply.content["arrays"].to_torch_state_dict()
            assert set(sent_back) == set(global_state)  # exactly the trainable tensors
            assert all(sent_back[n].shape == global_state[n].shape for n in sent_back)
            replies.append(reply)
        arrays, _ = FedAvg().aggregate_train(server_round, replies)
        global_state = arrays.to_torch_state_dict()
        load_trainable_state(server_model, global_state)
        losses.append(evaluate(server_model, test_loader, len(labels))["loss"])
    assert losses[-1] < 0.8 * losses[0], losses


def test_adapter_leaves_the_output_unchanged_at_init(tiny_bert):
    labels = ("negative", "positive")
    cfg = parse_run_config({"model": str(tiny_bert), "method": "adapter", "adapter-size": 8})
    adapted = build_model(cfg, str(tiny_bert), labels).eval()
    base = load_base_model(str(tiny_bert), labels, cfg.seed).eval()
    assert sum(".adapter." in n for n, _ in adapted.named_parameters()) == 2 * 2 * 4  # 2 layers
    inputs = {"input_ids": torch.randint(5, 30, (3, 9)), "attention_mask": torch.ones(3, 9).long()}
    with torch.no_grad():
        delta = (adapted(**inputs).logits - base(**inputs).logits).abs().max().item()
    assert delta == 0.0


def test_ffa_methods_keep_a_frozen_at_its_init(tiny_bert):
    labels = ("negative", "positive")
    for method in ("ffa-lora", "federa-ffa"):
        cfg = parse_run_config({"model": str(tiny_bert), "method": method, "lora-rank": 4})
        factors = initial_factors(cfg, str(tiny_bert), labels) if cfg.uses_svd_init else None
        model = build_model(cfg, str(tiny_bert), labels, factors)
        frozen_a = {n: p for n, p in model.named_parameters() if ".lora_A." in n}
        assert frozen_a and not any(p.requires_grad for p in frozen_a.values())
        if factors is not None:  # federa-ffa: A is FeDeRA's A0
            assert all(torch.equal(p, factors[n]) for n, p in frozen_a.items())
        again = build_model(cfg, str(tiny_bert), labels, factors)  # another party, same A
        assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in frozen_a.items())
