"""svd-avg: the maths against dense float64 references, and the strategy on real Flower Messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from federa_app.federation.svd_avg import SvdAvg, aggregate_lora_product, lora_pairs, product_error

# (out, in, r, n): n*r < min(out, in) takes the factored path, n*r >= min(out, in) the dense one.
SHAPES = [(40, 30, 2, 3), (8, 64, 2, 2), (24, 16, 4, 5), (6, 5, 4, 3)]


def random_clients(
    out_features: int, in_features: int, rank: int, n: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Float32 factors lora_A (r x in), lora_B (out x r) of n clients and normalised weights."""
    gen = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(rank, in_features, generator=gen) for _ in range(n)]
    lora_B = [torch.randn(out_features, rank, generator=gen) for _ in range(n)]
    counts = torch.randint(1, 100, (n,), generator=gen).tolist()
    return lora_A, lora_B, [c / sum(counts) for c in counts]


def dense_average(lora_A, lora_B, weights) -> torch.Tensor:
    """M = sum_i w_i B_i @ A_i, formed densely in float64."""
    return sum(w * b.double() @ a.double() for a, b, w in zip(lora_A, lora_B, weights, strict=True))


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - reference) / torch.linalg.norm(reference))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
def test_product_is_truncated_svd_of_the_weighted_average(shape, seed):
    out_features, in_features, rank, n = shape
    lora_A, lora_B, weights = random_clients(*shape, seed)
    lora_A_agg, lora_B_agg = aggregate_lora_product(lora_A, lora_B, weights, rank)
    assert lora_A_agg.shape == (rank, in_features) and lora_B_agg.shape == (out_features, rank)
    assert lora_A_agg.dtype == lora_B_agg.dtype == torch.float32

    u, s, vh = torch.linalg.svd(dense_average(lora_A, lora_B, weights))
    k = min(rank, s.numel())
    best_rank_r = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    assert relative_error(lora_B_agg @ lora_A_agg, best_rank_r) < 1e-5

    # sqrt(S) on each side: A A^T == B^T B == diag(S_r), zero-padded past the matrix's rank.
    balanced = torch.zeros(rank, rank, dtype=torch.float64)
    balanced[:k, :k] = torch.diag(s[:k])
    tol = 1e-5 * float(s[0])
    torch.testing.assert_close((lora_A_agg @ lora_A_agg.T).double(), balanced, atol=tol, rtol=0)
    torch.testing.assert_close((lora_B_agg.T @ lora_B_agg).double(), balanced, atol=tol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_one_client_gets_its_own_product_back(shape):
    lora_A, lora_B, _ = random_clients(*shape[:3], n=1, seed=7)
    lora_A_agg, lora_B_agg = aggregate_lora_product(lora_A, lora_B, [1.0], shape[2])
    client_product = lora_B[0].double() @ lora_A[0].double()
    assert relative_error(lora_B_agg @ lora_A_agg, client_product) < 1e-5


def fedavg_factors(lora_A, lora_B, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg's separately averaged factors, in float32 as FedAvg returns them."""
    mean_A = sum(w * a.double() for a, w in zip(lora_A, weights, strict=True))
    mean_B = sum(w * b.double() for b, w in zip(lora_B, weights, strict=True))
    return mean_A.float(), mean_B.float()


@pytest.mark.parametrize("equal_A", [False, True])
def test_svd_error_never_exceeds_fedavg_error(equal_A):
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        shape = torch.randint(2, 12, (4,), generator=gen).tolist()  # (out, in, r, n)
        lora_A, lora_B, weights = random_clients(*shape, seed)
        rank, n = shape[2:]
        if equal_A:  # then mean(B) @ A is the exact average and both errors vanish
            lora_A = [lora_A[0]] * n
        svd_error_sq, norm_sq = product_error(
            lora_A, lora_B, weights, *aggregate_lora_product(lora_A, lora_B, weights, rank)
        )
        fedavg_error_sq, _ = product_error(
            lora_A, lora_B, weights, *fedavg_factors(lora_A, lora_B, weights)
        )
        svd_error = (svd_error_sq / norm_sq) ** 0.5
        fedavg_error = (fedavg_error_sq / norm_sq) ** 0.5
        assert svd_error <= fedavg_error + 1e-6, (seed, svd_error, fedavg_error)
        if equal_A:
            assert svd_error < 1e-5 and fedavg_error < 1e-5, (seed, svd_error, fedavg_error)


@pytest.mark.parametrize("shape", SHAPES)
def test_factored_error_matches_dense(shape):
    lora_A, lora_B, weights = random_clients(*shape, seed=3)
    dense = dense_average(lora_A, lora_B, weights)
    candidates = [
        aggregate_lora_product(lora_A, lora_B, weights, shape[2]),
        fedavg_factors(lora_A, lora_B, weights),
    ]
    for lora_A_hat, lora_B_hat in candidates:
        error_sq, norm_sq = product_error(lora_A, lora_B, weights, lora_A_hat, lora_B_hat)
        dense_norm_sq = float(dense.square().sum())
        dense_error_sq = float((dense - lora_B_hat.double() @ lora_A_hat.double()).square().sum())
        assert norm_sq == pytest.approx(dense_norm_sq, rel=1e-10)
        assert error_sq == pytest.approx(dense_error_sq, abs=1e-10 * dense_norm_sq)


# --- the strategy on real Flower Messages ---------------------------------------------------

PREFIX = "base_model.model.bert.encoder.layer"
HEAD = "base_model.model.classifier.modules_to_save.default"
RANK, HIDDEN, LABELS = 2, 12, 3


def lora_name(layer: int, module: str, factor: str) -> str:
    return f"{PREFIX}.{layer}.attention.self.{module}.lora_{factor}.default.weight"


def client_state(seed: int) -> dict[str, torch.Tensor]:
    """A peft-style trainable state dict as it crosses the wire: LoRA pairs, then the head."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(2):
        for module in ("query", "value"):
            state[lora_name(layer, module, "A")] = torch.randn(RANK, HIDDEN, generator=gen)
            state[lora_name(layer, module, "B")] = torch.randn(HIDDEN, RANK, generator=gen)
    state[f"{HEAD}.weight"] = torch.randn(LABELS, HIDDEN, generator=gen)
    state[f"{HEAD}.bias"] = torch.randn(LABELS, generator=gen)
    return state


def train_reply(node_id: int, state: dict[str, torch.Tensor], num_examples: int) -> Message:
    """A ClientApp's train reply to the server's train instruction for `node_id`."""
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": num_examples, "train_loss": 0.1 * node_id}),
        }
    )
    return Message(content, reply_to=instruction)


def error_reply(node_id: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    return Message(Error(code=0, reason="ClientApp crashed"), reply_to=instruction)


NUM_EXAMPLES = [10, 30, 60]


@pytest.fixture
def states_and_replies(server_identity):
    states = [client_state(seed) for seed in range(len(NUM_EXAMPLES))]
    nodes = range(2, 2 + len(states))
    replies = [train_reply(*args) for args in zip(nodes, states, NUM_EXAMPLES, strict=True)]
    return states, replies


def test_strategy_end_to_end(states_and_replies):
    states, replies = states_and_replies
    strategy = SvdAvg(rank=RANK)
    arrays, metrics = strategy.aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()

    sent = states[0]
    assert list(result) == list(sent)
    assert {k: v.shape for k, v in result.items()} == {k: v.shape for k, v in sent.items()}
    assert all(v.dtype == torch.float32 for v in result.values())

    weights = [n / sum(NUM_EXAMPLES) for n in NUM_EXAMPLES]
    fedavg = FedAvg().aggregate_train(1, replies)[0].to_torch_state_dict()
    for name in (f"{HEAD}.weight", f"{HEAD}.bias"):
        torch.testing.assert_close(result[name], fedavg[name], rtol=0, atol=0)
        mean = sum(w * s[name] for w, s in zip(weights, states, strict=True))
        torch.testing.assert_close(result[name], mean)

    pairs = lora_pairs(sent)
    assert len(pairs) == 4
    for name_A, name_B in pairs:
        lora_A_agg, lora_B_agg = aggregate_lora_product(
            [s[name_A] for s in states], [s[name_B] for s in states], weights, RANK
        )
        torch.testing.assert_close(result[name_A], lora_A_agg)
        torch.testing.assert_close(result[name_B], lora_B_agg)

    errors = strategy.last_aggregation_errors
    assert set(errors) == {"aggregation_error_svd", "aggregation_error_fedavg"}
    assert 0 < errors["aggregation_error_svd"] <= errors["aggregation_error_fedavg"]
    assert {k: metrics[k] for k in errors} == errors
    train_loss = sum(w * 0.1 * node for w, node in zip(weights, [2, 3, 4], strict=True))
    assert metrics["train_loss"] == pytest.approx(train_loss)
    assert "num-examples" not in metrics  # FedAvg leaves the weighting key out


def test_error_replies_are_skipped_like_fedavg(states_and_replies):
    _, replies = states_and_replies
    strategy = SvdAvg(rank=RANK)
    with_error, _ = strategy.aggregate_train(1, [*replies[:2], error_reply(9)])
    without, _ = SvdAvg(rank=RANK).aggregate_train(1, replies[:2])
    for name, value in without.to_torch_state_dict().items():
        torch.testing.assert_close(with_error.to_torch_state_dict()[name], value, rtol=0, atol=0)

    # All replies failed: nothing to aggregate, as FedAvg answers, and no stale errors.
    assert (
        strategy.aggregate_train(2, [error_reply(9)])
        == FedAvg().aggregate_train(2, [error_reply(9)])
        == (None, None)
    )
    assert strategy.last_aggregation_errors == {}


def test_unpaired_or_wrong_rank_factor_is_named(server_identity):
    state = client_state(0)
    lonely = lora_name(1, "value", "B")
    del state[lonely]
    with pytest.raises(ValueError, match=lora_name(1, "value", "A")):
        SvdAvg(rank=RANK).aggregate_train(1, [train_reply(2, state, 5)])
    with pytest.raises(ValueError, match="lora_A.*rank 2"):
        SvdAvg(rank=RANK + 1).aggregate_train(1, [train_reply(2, client_state(0), 5)])
