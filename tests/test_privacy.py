"""Differential privacy: Flower's DP wrappers and clipping mods as `dp` maps them, computed for
real (clipping by hand, noise statistics, the adaptive norm's update) and run with every method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import InProcessGrid as Grid
from conftest import write_toy_csv
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from federa_app.config import METHODS, parse_run_config
from federa_app.data import loading
from federa_app.errors import ConfigError
from federa_app.federation.client import TRAIN_METRIC_KEYS, handle_train
from federa_app.federation.privacy import (
    dp_client_mod,
    dp_reply_metric_keys,
    dp_settings,
    sampled_per_round,
    with_dp,
)
from federa_app.federation.strategies import build_strategy
from federa_app.federation.wire import INIT_FACTORS_KEY, WireRecorder
from federa_app.method.models import build_model, initial_factors, trainable_state


def dp_config(dp: str, noise: float = 0.0, clip: float = 1.0, **extra):
    return parse_run_config(
        {"dp": dp, "dp-noise-multiplier": noise, "dp-clipping-norm": clip, **extra}
    )


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def reply_to(msg: Message, arrays: dict[str, np.ndarray], examples: int = 10) -> Message:
    metrics = MetricRecord({"num-examples": examples})
    return Message(RecordDict({"arrays": record(arrays), "metrics": metrics}), reply_to=msg)


def flat_norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays.values())))


def scaled(arrays: dict[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """`arrays` rescaled to the given total L2 norm."""
    factor = norm / flat_norm(arrays)
    return {name: a * factor for name, a in arrays.items()}


def random_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}


def add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def train_message(content: dict, node: int = 11) -> Message:
    return Message(RecordDict(content), dst_node_id=node, message_type="train")


# --- server side ---------------------------------------------------------------------------


def test_server_fixed_averages_updates_clipped_to_the_norm(server_identity):
    rng = np.random.default_rng(0)
    clip = 1.0
    cfg = dp_config("server-fixed", noise=0.0, clip=clip)
    strategy = with_dp(FedAvg(), cfg, num_sampled=3)
    global_arrays = random_arrays(rng)
    messages = list(
        strategy.configure_train(1, record(global_arrays), ConfigRecord(), Grid([1, 2, 3]))
    )
    updates = [scaled(random_arrays(rng), norm) for norm in (3.0, 0.4, 1.5)]
    examples = [10, 30, 60]
    replies = [
        reply_to(m, add(global_arrays, u), n)
        for m, u, n in zip(messages, updates, examples, strict=True)
    ]
    aggregated, _ = strategy.aggregate_train(1, replies)
    got = aggregated.to_numpy_ndarrays()

    clipped = [{k: v * min(1.0, clip / flat_norm(u)) for k, v in u.items()} for u in updates]
    for i, name in enumerate(global_arrays):
        expected = global_arrays[name] + sum(
            n * c[name] for n, c in zip(examples, clipped, strict=True)
        ) / sum(examples)
        unclipped = global_arrays[name] + sum(
            n * u[name] for n, u in zip(examples, updates, strict=True)
        ) / sum(examples)
        np.testing.assert_allclose(got[i], expected, atol=1e-9)
        assert not np.allclose(got[i], unclipped)  # the clipping mattered


def test_server_fixed_noise_has_the_std_flower_promises(server_identity):
    """std = noise multiplier * clipping norm / sampled nodes, on every element."""
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    noise, clip, sampled = 2.0, 0.5, 4
    strategy = with_dp(FedAvg(), dp_config("server-fixed", noise=noise, clip=clip), sampled)
    zeros = {"w": np.zeros(100_000, dtype=np.float32)}
    # Every node sends the same small update: the aggregate minus it is the noise alone. (A zero
    # update would crash Flower's clipping: it divides by the update's norm.)
    update = {"w": np.full(100_000, 1e-4, dtype=np.float32)}
    messages = strategy.configure_train(1, record(zeros), ConfigRecord(), Grid(range(sampled)))
    replies = [reply_to(m, update) for m in messages]
    aggregated, _ = strategy.aggregate_train(1, replies)
    values = aggregated.to_numpy_ndarrays()[0] - update["w"]
    assert values.std() == pytest.approx(noise * clip / sampled, rel=0.02)
    assert abs(values.mean()) < 0.01


def test_flower_dp_skips_rounds_with_errors_and_keeps_the_noise_of_the_full_sample(
    server_identity,
):
    """Flower's DP wrappers, unlike FedAvg, drop the whole round when one reply is an error;
    with fewer replies than sampled they only warn and still divide the noise by the sample."""
    np.random.seed(1)
    strategy = with_dp(FedAvg(), dp_config("server-fixed", noise=1.0, clip=1.0), 4)
    zeros = {"w": np.zeros(50_000, dtype=np.float32)}
    update = {"w": np.full(50_000, 1e-4, dtype=np.float32)}
    messages = list(strategy.configure_train(1, record(zeros), ConfigRecord(), Grid(range(4))))
    failed = Message(Error(code=0, reason="node crashed"), reply_to=messages[1])
    assert strategy.aggregate_train(1, [reply_to(messages[0], update), failed]) == (None, None)
    assert FedAvg().aggregate_train(1, [reply_to(messages[0], update), failed])[0] is not None

    strategy.configure_train(2, record(zeros), ConfigRecord(), Grid(range(4)))
    aggregated, _ = strategy.aggregate_train(2, [reply_to(messages[0], update)])
    noise = aggregated.to_numpy_ndarrays()[0] - update["w"]
    assert noise.std() == pytest.approx(1.0 / 4, rel=0.03)  # not 1.0 / 1: under-noised


# --- adaptive clipping ---------------------------------------------------------------------


@pytest.mark.parametrize("norms", [(0.1, 0.2), (3.0, 4.0), (0.5, 2.0)])
def test_server_adaptive_moves_the_norm_by_flowers_rule(server_identity, norms):
    """C <- C * exp(-lr * (clipped fraction - target)), as Flower 1.42 implements it; note that
    this moves C away from the updates (the paper uses the *unclipped* fraction)."""
    rng = np.random.default_rng(1)
    clip = 1.0
    strategy = with_dp(FedAvg(), dp_config("server-adaptive", noise=0.0, clip=clip), 2)
    global_arrays = random_arrays(rng)
    messages = strategy.configure_train(1, record(global_arrays), ConfigRecord(), Grid([1, 2]))
    updates = [scaled(random_arrays(rng), n) for n in norms]
    replies = [reply_to(m, add(global_arrays, u)) for m, u in zip(messages, updates, strict=True)]
    aggregated, _ = strategy.aggregate_train(1, replies)

    clipped_fraction = sum(n > clip for n in norms) / len(norms)
    expected = clip * math.exp(-strategy.clip_norm_lr * (clipped_fraction - 0.5))
    assert strategy.clipping_norm == pytest.approx(expected)
    assert (strategy.clipping_norm == clip) == (clipped_fraction == 0.5)
    # This round still clipped with the norm it started with.
    mean_update = {
        k: np.mean([u[k] * min(1, clip / flat_norm(u)) for u in updates], axis=0)
        for k in global_arrays
    }
    for got, name in zip(aggregated.to_numpy_ndarrays(), global_arrays, strict=True):
        np.testing.assert_allclose(got, global_arrays[name] + mean_update[name], atol=1e-9)


def test_client_adaptive_norm_follows_the_norm_bits_of_the_client_mod(server_identity):
    rng = np.random.default_rng(2)
    cfg = dp_config("client-adaptive", noise=0.0, clip=1.0)
    strategy = with_dp(FedAvg(), cfg, 2)
    global_arrays = random_arrays(rng)
    messages = list(
        strategy.configure_train(1, record(global_arrays), ConfigRecord(), Grid([11, 12]))
    )
    assert messages[0].content["config"][KEY_CLIPPING_NORM] == 1.0  # the wrapper sends it
    context = Context(1, 11, {}, RecordDict(), {"dp": "client-adaptive"})
    replies = []
    for message, norm in zip(messages, (0.3, 0.6), strict=True):  # both below the norm
        update = scaled(random_arrays(rng), norm)
        reply = dp_client_mod(
            message, context, lambda m, _, u=update: reply_to(m, add(global_arrays, u))
        )
        assert reply.content["metrics"][KEY_NORM_BIT] == 0
        replies.append(reply)
    strategy.aggregate_train(1, replies)
    assert strategy.clipping_norm == pytest.approx(math.exp(0.2 * 0.5))  # Flower's rule
    next_round = strategy.configure_train(2, record(global_arrays), ConfigRecord(), Grid([11, 12]))
    assert next(iter(next_round)).content["config"][KEY_CLIPPING_NORM] == strategy.clipping_norm


def test_adaptive_noise_too_large_for_the_sample_is_a_config_error():
    """Flower spends part of the noise on the clipped count (stddev = sampled/20)."""
    with pytest.raises(ConfigError, match="dp-noise-multiplier < 0.2"):
        with_dp(FedAvg(), dp_config("server-adaptive", noise=1.0), 2)
    assert with_dp(FedAvg(), dp_config("client-adaptive", noise=1.0), 20) is not None
    with pytest.raises(ConfigError, match="at least one node"):
        with_dp(FedAvg(), dp_config("server-fixed"), 0)


# --- client side ---------------------------------------------------------------------------


def test_client_fixed_mod_clips_the_reply_and_moves_the_init_factors(server_identity):
    rng = np.random.default_rng(3)
    global_arrays, update = random_arrays(rng), scaled(random_arrays(rng), 5.0)
    factors = record({"lora_A": np.ones((2, 3))})
    content = {
        "arrays": record(global_arrays),
        "config": ConfigRecord({KEY_CLIPPING_NORM: 0.5}),
        INIT_FACTORS_KEY: factors,
    }
    seen = []

    def call_next(msg: Message, _context: Context) -> Message:
        seen.append(set(msg.content.array_records))
        return reply_to(msg, add(global_arrays, update))

    # Flower's mod alone refuses FeDeRA's first message: it holds two ArrayRecords.
    assert fixedclipping_mod(
        train_message(content), Context(1, 11, {}, RecordDict(), {}), call_next
    ).has_error()

    context = Context(1, 11, {}, RecordDict(), {"dp": "client-fixed"})
    reply = dp_client_mod(train_message(content), context, call_next)
    assert not reply.has_error()
    assert seen == [{"arrays"}]
    assert context.state[INIT_FACTORS_KEY] is factors
    sent = dict(zip(global_arrays, reply.content["arrays"].to_numpy_ndarrays(), strict=True))
    clipped = {k: sent[k] - global_arrays[k] for k in sent}
    assert flat_norm(clipped) == pytest.approx(0.5)
    for name in update:
        np.testing.assert_allclose(clipped[name], update[name] * 0.5 / 5.0, atol=1e-12)

    # dp=none, or a message that is not a train message: untouched, factors stay in the message.
    for run_config, message_type in (({}, "train"), ({"dp": "client-fixed"}, "evaluate")):
        seen.clear()
        msg = Message(RecordDict(content), dst_node_id=11, message_type=message_type)
        reply = dp_client_mod(msg, Context(1, 11, {}, RecordDict(), run_config), call_next)
        assert seen == [{"arrays", INIT_FACTORS_KEY}]
        np.testing.assert_allclose(
            reply.content["arrays"].to_numpy_ndarrays()[0], global_arrays["w"] + update["w"]
        )


def _toy_run_config(tmp_path, tiny_bert, method: str, **extra) -> dict:
    csv = write_toy_csv(tmp_path / "toy.csv", rows=160)
    return {
        "model": str(tiny_bert), "dataset": f"csv:{csv}", "method": method, "partitioner": "iid",
        "lora-rank": 4, "lora-alpha": 8, "adapter-size": 8, "local-steps": 2, "batch-size": 8,
        "learning-rate": 0.05, "min-available-nodes": 2, **extra,
    }  # fmt: skip


def _server_side(run_config: dict):
    cfg = parse_run_config(run_config)
    _, _, labels = loading.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    factors = initial_factors(cfg, cfg.model, labels) if cfg.uses_svd_init else None
    state = trainable_state(build_model(cfg, cfg.model, labels, factors))
    return cfg, labels, factors, {name: t.detach().clone() for name, t in state.items()}


def test_client_fixed_clips_a_real_federa_update(tmp_path, tiny_bert, server_identity):
    """FeDeRA's first message (with its factors) through the mod around the real handle_train."""
    run_config = _toy_run_config(tmp_path, tiny_bert, "federa", dp="client-fixed")
    cfg, labels, factors, global_state = _server_side(run_config)
    clip = 1e-3  # well below a training step's update, so the clipping acts
    content = {
        "arrays": ArrayRecord(global_state),
        "config": ConfigRecord({KEY_CLIPPING_NORM: clip, loading.LABELS_KEY: list(labels)}),
        INIT_FACTORS_KEY: ArrayRecord(factors),
    }
    context = Context(1, 11, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config)
    unclipped = {}

    def train(msg: Message, ctx: Context) -> Message:
        reply = handle_train(msg, ctx)
        unclipped.update(reply.content["arrays"].to_torch_state_dict())
        return reply

    reply = dp_client_mod(train_message(content), context, train)
    assert not reply.has_error()
    assert INIT_FACTORS_KEY in context.state
    sent = reply.content["arrays"].to_torch_state_dict()
    assert list(sent) == list(global_state)
    raw = {k: (unclipped[k] - global_state[k]).double() for k in sent}
    raw_norm = math.sqrt(sum(float(d.square().sum()) for d in raw.values()))
    assert raw_norm > 10 * clip
    got = {k: (sent[k] - global_state[k]).double() for k in sent}
    got_norm = math.sqrt(sum(float(d.square().sum()) for d in got.values()))
    assert got_norm == pytest.approx(clip, rel=1e-3)
    for name in sent:
        torch.testing.assert_close(got[name], raw[name] * clip / raw_norm, atol=1e-7, rtol=1e-3)


# --- the whole round, every method ---------------------------------------------------------


def _federated_rounds(tmp_path, tiny_bert, method: str, dp: str, noise: float, rounds: int):
    """`rounds` rounds of the DP-wrapped configured strategy over two real ClientApps."""
    run_config = _toy_run_config(
        tmp_path,
        tiny_bert,
        method,
        dp=dp,
        **{"dp-noise-multiplier": noise, "dp-clipping-norm": 0.01},
    )
    cfg, labels, factors, global_state = _server_side(run_config)
    contexts = {
        node: Context(1, node, {"partition-id": i, "num-partitions": 2}, RecordDict(), run_config)
        for i, node in enumerate((11, 12))
    }
    grid = Grid(contexts, contexts)
    strategy = with_dp(build_strategy(cfg), cfg, sampled_per_round(cfg, len(contexts)))
    result = strategy.start(
        grid=WireRecorder(grid, ArrayRecord(factors) if factors is not None else None),
        initial_arrays=ArrayRecord(global_state),
        num_rounds=rounds,
        train_config=ConfigRecord({loading.LABELS_KEY: list(labels)}),
    )
    return cfg, strategy, grid, global_state, result.arrays.to_torch_state_dict()


@pytest.mark.parametrize("method", METHODS)
def test_client_fixed_runs_with_every_method(tmp_path, tiny_bert, server_identity, method):
    cfg, strategy, grid, sent, final = _federated_rounds(
        tmp_path, tiny_bert, method, "client-fixed", noise=0.5, rounds=2
    )
    assert len(grid.replies) == 4 and not any(r.has_error() for r in grid.replies)
    for reply in grid.replies[:2]:  # round 1 updates, clipped on the nodes
        arrays = reply.content["arrays"].to_torch_state_dict()
        update = math.sqrt(sum(float((arrays[k] - sent[k]).double().square().sum()) for k in sent))
        assert update <= 0.01 * (1 + 1e-4)
    assert list(final) == list(sent)
    assert all(final[k].shape == sent[k].shape and final[k].isfinite().all() for k in sent)
    assert any(not torch.equal(final[k], sent[k]) for k in sent)  # two rounds were aggregated
    assert dp_settings(strategy, cfg)["dp"] == "client-fixed"


@pytest.mark.parametrize("dp", ["server-fixed", "client-adaptive", "server-adaptive"])
def test_other_modes_run_a_federa_round(tmp_path, tiny_bert, server_identity, dp):
    cfg, strategy, grid, sent, final = _federated_rounds(
        tmp_path, tiny_bert, "federa", dp, noise=0.1, rounds=1
    )
    assert not any(r.has_error() for r in grid.replies)
    assert list(final) == list(sent)
    assert all(final[k].isfinite().all() for k in sent)
    assert any(not torch.equal(final[k], sent[k]) for k in sent)
    settings = dp_settings(strategy, cfg)
    if dp.endswith("adaptive"):  # updates of a real step are far above 0.01: the norm moved
        assert settings["dp_final_clipping_norm"] != settings["dp_clipping_norm"]
    # What a reply's metrics hold (the server rejects other keys): client-adaptive adds one.
    keys = set(TRAIN_METRIC_KEYS) | set(dp_reply_metric_keys(cfg))
    assert (KEY_NORM_BIT in keys) == (dp == "client-adaptive")
    assert all(set(r.content["metrics"]) == keys for r in grid.replies)


# --- config, summary, sampling -------------------------------------------------------------


def test_dp_none_leaves_the_strategy_alone_and_the_summary_records_the_settings():
    strategy = FedAvg()
    assert with_dp(strategy, dp_config("none"), 2) is strategy
    assert dp_settings(strategy, dp_config("none")) == {"dp": "none"}

    cfg = dp_config("client-fixed", noise=0.8, clip=2.0)
    wrapped = with_dp(strategy, cfg, 3)
    assert isinstance(wrapped, DifferentialPrivacyClientSideFixedClipping)
    assert wrapped.strategy is strategy
    assert dp_settings(wrapped, cfg) == {
        "dp": "client-fixed",
        "dp_noise_multiplier": 0.8,
        "dp_clipping_norm": 2.0,
        "dp_final_clipping_norm": 2.0,
        "dp_update_noise_multiplier": 0.8,
        "dp_num_sampled_clients": 3,
    }

    cfg = dp_config("server-adaptive", noise=0.5, clip=0.3)
    wrapped = with_dp(strategy, cfg, 20)
    assert isinstance(wrapped, DifferentialPrivacyServerSideAdaptiveClipping)
    settings = dp_settings(wrapped, cfg)
    assert settings["dp_clipping_norm"] == settings["dp_final_clipping_norm"] == 0.3
    assert settings["dp_noise_multiplier"] == 0.5
    # Flower raises the update noise to pay for the noisy clipped count (stddev 20/20 = 1).
    assert settings["dp_clipped_count_stddev"] == 1.0
    assert settings["dp_update_noise_multiplier"] == pytest.approx((0.5**-2 - 2.0**-2) ** -0.5)
    wrapped.clipping_norm = 0.25  # what an adaptive round does
    assert dp_settings(wrapped, cfg)["dp_final_clipping_norm"] == 0.25


@pytest.mark.parametrize(
    ("num_nodes", "fraction", "min_train"), [(10, 0.35, 2), (10, 0.1, 2), (5, 1.0, 0), (7, 0.5, 3)]
)
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "qfedavg", "svd-avg"])
def test_sampled_per_round_is_what_the_strategy_samples(
    server_identity, num_nodes, fraction, min_train, name
):
    cfg = parse_run_config(
        {
            "strategy": name,
            "dp": "server-fixed",
            "fraction-train": fraction,
            "min-train-nodes": min_train,
            "min-available-nodes": 0,
        }
    )
    expected = sampled_per_round(cfg, num_nodes)
    strategy = with_dp(build_strategy(cfg), cfg, expected)
    arrays = record({"w": np.zeros(3)})
    messages = strategy.configure_train(1, arrays, ConfigRecord(), Grid(range(num_nodes)))
    assert len(list(messages)) == expected == strategy.num_sampled_clients
