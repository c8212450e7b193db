"""Every strategy learns with every method it accepts, or refuses it before anything starts.

The whole server (`run_server`: validation, the round loop, server-side evaluation) runs against
real ClientApps in this process, on the tiny BERT and a toy task that every method learns under
FedAvg; each strategy's parameters are left at "", as a user who only swaps `strategy` gets them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import InProcessGrid, write_toy_csv
from flwr.app import Array, ArrayRecord, Context, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from federa_app.config import METHODS, STRATEGIES, parse_run_config
from federa_app.errors import ConfigError
from federa_app.federation.server import check_before_start, run_server
from federa_app.federation.strategies import (
    STRATEGY_CLASSES,
    build_strategy,
    check_node_count,
    refusal,
    resolved_parameters,
)

NODES = 3
ROUNDS = 4
# Toy learning rates at which every method learns under FedAvg (the tiny model is no BERT).
TOY_LEARNING_RATES = {"fft": 0.002, "bitfit": 0.02}


def toy_run_config(tmp_path, tiny_bert, strategy: str, method: str, **extra) -> dict:
    csv = tmp_path / "toy.csv"
    if not csv.exists():
        write_toy_csv(csv, rows=400)
    return {
        "model": str(tiny_bert), "dataset": f"csv:{csv}", "method": method, "strategy": strategy,
        "partitioner": "iid", "lora-rank": 4, "lora-alpha": 8, "adapter-size": 8,
        "local-steps": 10, "batch-size": 8, "learning-rate": TOY_LEARNING_RATES.get(method, 0.01),
        "num-threads": 1,
        "num-server-rounds": ROUNDS, "min-available-nodes": NODES,
        "output-dir": str(tmp_path / "runs"), "run-name": f"{strategy}-{method}", **extra,
    }  # fmt: skip


def run_in_process(run_config: dict, nodes: int = NODES) -> list[dict]:
    """The ServerApp's work over `nodes` real in-process ClientApps; the metrics rows."""
    contexts = {
        100 + i: Context(
            1, 100 + i, {"partition-id": i, "num-partitions": nodes}, RecordDict(), run_config
        )  # fmt: skip
        for i in range(nodes)
    }
    run_server(InProcessGrid(contexts, contexts), Context(1, 0, {}, RecordDict(), run_config))
    run_dir = f"{run_config['output-dir']}/{run_config['run-name']}"
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_lowers_the_loss_with_every_method_it_accepts(
    strategy, tmp_path, tiny_bert, server_identity, frozen_heap
):
    not_learning = []
    for method in METHODS:
        run_config = toy_run_config(tmp_path, tiny_bert, strategy, method)
        reason = refusal(strategy, method)
        if reason:  # refused by the checks every entry point runs before Ray or a model starts
            with pytest.raises(ConfigError, match=f"strategy {strategy}"):
                check_before_start(parse_run_config(run_config), NODES)
            with pytest.raises(ConfigError, match=f"strategy {strategy}"):
                run_in_process(run_config)
            assert not (tmp_path / "runs" / f"{strategy}-{method}").exists()
            continue
        rows = run_in_process(run_config)
        assert not any(r["rejected"] for r in rows), (strategy, method, rows[-1]["rejected_nodes"])
        assert all(r["counted"] for r in rows), (strategy, method)
        # Learns: some round within ROUNDS gets below 0.8x the round-0 loss (Krum follows a
        # single node's model, so its loss moves round to round), and the last is still lower.
        losses = [r["loss"] for r in rows]
        if not (min(losses[1:]) < 0.8 * losses[0] and losses[-1] < losses[0]):
            not_learning.append(f"{method}: loss {[round(loss, 3) for loss in losses]}")
    assert not not_learning, f"{strategy} does not learn with " + "; ".join(not_learning)


def test_the_server_optimisers_return_the_models_dtypes(tmp_path, tiny_bert, server_identity):
    """Flower's FedAdam computes in float64; a float64 global model made every later reply of
    a float32 node fail validation, so only round 1 ever counted."""
    for strategy in ("fedadam", "fedyogi", "fedadagrad"):
        rows = run_in_process(toy_run_config(tmp_path, tiny_bert, strategy, "lora", **{
            "num-server-rounds": 2}))  # fmt: skip
        assert [r["clients"] for r in rows] == [0, NODES, NODES], strategy
        assert rows[2]["rejected_nodes"] == [], strategy


def server_steps(strategy, monkeypatch, push: float = 0.05, rounds: int = 10) -> list[float]:
    """The server's step per round when the clients' average always moves every element by
    `push` (FedAvg's aggregate stubbed: the server optimiser's own arithmetic is under test)."""
    arrays = {"w": np.zeros(4, dtype=np.float32)}
    steps = []
    for server_round in range(1, rounds + 1):
        average = ArrayRecord({"w": Array(arrays["w"] + np.float32(push))})
        monkeypatch.setattr(
            flwr_strategy.FedAvg,
            "aggregate_train",
            lambda self, r, replies, average=average: (average, None),
        )
        strategy.current_arrays = dict(arrays)
        new = strategy.aggregate_train(server_round, [])[0]["w"].numpy()
        steps.append(float(new[0] - arrays["w"][0]))
        arrays = {"w": new}
    return steps


def test_fedyogi_steps_like_fedadam_when_the_clients_keep_pushing_one_way(monkeypatch):
    """Flower's FedYogi lacks FedAdam's bias correction: its step grows to ~2 eta; ours does not."""
    eta = 0.03
    ours = server_steps(STRATEGY_CLASSES["fedyogi"](eta=eta, tau=0.001), monkeypatch)
    flowers = server_steps(flwr_strategy.FedYogi(eta=eta, tau=0.001), monkeypatch)
    adam = server_steps(STRATEGY_CLASSES["fedadam"](eta=eta, tau=0.001), monkeypatch)
    assert max(flowers) > 1.8 * eta  # the overshoot behind fedyogi's Dirichlet 0.5 result
    assert max(ours) <= eta  # FedAdam's alpha_t: ~0.6 eta in round 1, towards eta after
    assert ours == pytest.approx(adam, rel=0.05)  # v_t differs, but little in 10 rounds


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("eta", -0.1, "must be > 0"),
        ("eta", 0, "must be > 0"),
        ("server-learning-rate", -1.0, "must be > 0"),
        ("client-learning-rate", 0.0, "must be > 0"),
        ("beta-1", 1.0, r"in \[0, 1\)"),
        ("beta-2", -0.5, r"in \[0, 1\)"),
        ("server-momentum", 1.5, r"in \[0, 1\)"),
        ("beta", 0.5, r"in \[0, 0.5\)"),
        ("tau", 0.0, "must be > 0"),
        ("proximal-mu", -0.01, "must be >= 0"),
        ("num-nodes-to-select", 0, "must be >= 1"),
    ],
)
def test_strategy_parameters_out_of_range_are_one_line_errors(key, value, valid):
    with pytest.raises(ConfigError, match=f"run-config {key}={value!r}".replace(".", r"\.")) as e:
        parse_run_config({key: value})
    assert "\n" not in str(e.value)
    assert e.match(valid)


@pytest.mark.parametrize(
    ("strategy", "params", "nodes", "needed"),
    [
        ("krum", {"num-malicious-nodes": 1}, 4, 5),
        ("multikrum", {"num-malicious-nodes": 2}, 6, 7),
        ("bulyan", {"num-malicious-nodes": 1}, 6, 7),
        ("bulyan", {}, 2, 3),
    ],
)
def test_robust_strategies_refuse_more_malicious_nodes_than_the_round_can_outvote(
    strategy, params, nodes, needed
):
    cfg = parse_run_config({"strategy": strategy, "min-available-nodes": 2, **params})
    f = params.get("num-malicious-nodes", 0)
    expected = (
        f"strategy {strategy} with num-malicious-nodes={f} needs at least {needed} nodes per "
        f"round .*; {nodes} of {nodes} nodes are sampled"
    )
    with pytest.raises(ConfigError, match=expected):
        check_node_count(cfg, nodes, nodes)
    check_node_count(cfg, needed, needed)  # enough: no error


def test_multikrum_cannot_select_more_nodes_than_remain_after_the_malicious_ones():
    cfg = parse_run_config(
        {"strategy": "multikrum", "num-malicious-nodes": 1, "num-nodes-to-select": 5}
    )
    with pytest.raises(ConfigError, match="num-nodes-to-select=5 can select at most 4 of the 5"):
        check_node_count(cfg, 5, 5)


def test_robust_node_count_is_checked_before_ray_starts(tmp_path, tiny_bert):
    run_config = toy_run_config(tmp_path, tiny_bert, "bulyan", "lora", **{
        "num-malicious-nodes": 1})  # fmt: skip
    with pytest.raises(ConfigError, match="bulyan with num-malicious-nodes=1 needs at least 7"):
        check_before_start(parse_run_config(run_config), 6)


def test_an_explicit_value_wins_and_config_json_says_where_each_came_from(
    tmp_path, tiny_bert, server_identity
):
    run_config = toy_run_config(tmp_path, tiny_bert, "fedadam", "lora", **{
        "num-server-rounds": 1, "tau": 0.01})  # fmt: skip
    run_in_process(run_config)
    config = json.loads((tmp_path / "runs" / "fedadam-lora" / "config.json").read_text())
    cfg = parse_run_config(run_config)
    values, sources = resolved_parameters(cfg)
    assert config["strategy-settings-source"] == sources
    assert sources["tau"] == "run-config" and config["strategy-settings"]["tau"] == 0.01
    strategy = build_strategy(cfg)
    for key, value in config["strategy-settings"].items():
        assert getattr(strategy, key.replace("-", "_")) == value
        if sources[key] != "flower default":
            assert values[key] == value
