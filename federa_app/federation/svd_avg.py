"""`svd-avg`: aggregate LoRA adapters by averaging their updates, not their factors.

A LoRA layer adds scaling * lora_B @ lora_A to a frozen weight. FedAvg averages lora_A and lora_B
separately, and mean(B) @ mean(A) != mean(B @ A): the server's update is not the clients' average.
`SvdAvg` forms the exact weighted average M = sum_i w_i B_i @ A_i of every adapted matrix and sends
back its best rank-r approximation (Eckart-Young), split like FeDeRA's init: B = U_r sqrt(S_r),
A = sqrt(S_r) V_r^T. `scaling` is the same on every client, so it cancels. Everything else (the
task head, biases) is averaged exactly as FedAvg does. Each round it reports both aggregation
errors relative to ||M||_F: this strategy's and the one FedAvg's factor averaging would make.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log
from torch import Tensor


def stack_factors(
    lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """(A_stack, B_stack) in float64 with B_stack @ A_stack = sum_i w_i B_i @ A_i.

    A_stack = [A_1; ...; A_n] is (n*r x in), B_stack = [w_1 B_1 | ... | w_n B_n] is (out x n*r).
    """
    a_stack = torch.cat([a.double() for a in lora_A], dim=0)
    b_stack = torch.cat([w * b.double() for w, b in zip(weights, lora_B, strict=True)], dim=1)
    return a_stack, b_stack


def aggregate_lora_product(
    lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], weights: Sequence[float], rank: int
) -> tuple[Tensor, Tensor]:
    """(A, B) whose product is the best rank-`rank` approximation of sum_i w_i B_i @ A_i.

    sqrt(S_r) goes on each factor (FeDeRA's split). Float64 inside, the input dtype out; where
    the matrix has fewer than `rank` nonzero singular values the extra rows/columns are zero.
    """
    a_stack, b_stack = stack_factors(lora_A, lora_B, weights)
    out_features, in_features = b_stack.shape[0], a_stack.shape[1]
    if b_stack.shape[1] >= min(out_features, in_features):
        # The stack is no thinner than the matrix: the dense product is no bigger, and simpler.
        u, s, vh = torch.linalg.svd(b_stack @ a_stack, full_matrices=False)
    else:
        # M = Q_b (R_b R_a^T) Q_a^T with orthonormal Q's, so M's SVD is the small core's, rotated.
        q_b, r_b = torch.linalg.qr(b_stack)
        q_a, r_a = torch.linalg.qr(a_stack.T)
        u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
        u, vh = q_b @ u_core[:, :rank], vh_core[:rank] @ q_a.T
    k = min(rank, s.numel())
    sqrt_s = s[:k].sqrt()
    lora_A_agg = a_stack.new_zeros(rank, in_features)
    lora_B_agg = b_stack.new_zeros(out_features, rank)
    lora_A_agg[:k] = sqrt_s[:, None] * vh[:k]
    lora_B_agg[:, :k] = u[:, :k] * sqrt_s
    return lora_A_agg.to(lora_A[0].dtype), lora_B_agg.to(lora_B[0].dtype)


def product_norm_sq(p: Tensor, q: Tensor) -> float:
    """||P @ Q||_F^2 as trace((P^T P)(Q Q^T)), from two small Gram matrices only."""
    return float(((p.T @ p) * (q @ q.T)).sum())


def product_error(
    lora_A: Sequence[Tensor],
    lora_B: Sequence[Tensor],
    weights: Sequence[float],
    lora_A_hat: Tensor,
    lora_B_hat: Tensor,
) -> tuple[float, float]:
    """(||M - B_hat @ A_hat||_F^2, ||M||_F^2) for M = sum_i w_i B_i @ A_i, in factored form.

    M - B_hat @ A_hat = [B_stack | -B_hat] @ [A_stack; A_hat], so no out x in matrix is formed.
    """
    a_stack, b_stack = stack_factors(lora_A, lora_B, weights)
    p = torch.cat([b_stack, -lora_B_hat.double()], dim=1)
    q = torch.cat([a_stack, lora_A_hat.double()], dim=0)
    # A difference of sums in float64: clamp the rounding noise (~1e-16 ||M||^2) below zero.
    return max(product_norm_sq(p, q), 0.0), product_norm_sq(b_stack, a_stack)


def _is_lora_factor(name: str) -> bool:
    # lora_B's bias (peft's `lora_bias=True`) is additive: FedAvg's mean is exact for it.
    return ("lora_A" in name or "lora_B" in name) and name.endswith("weight")


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(lora_A name, lora_B name) of every adapted matrix, in the order given.

    Raises ValueError naming a LoRA factor that arrived without its partner.
    """
    factors = [name for name in names if _is_lora_factor(name)]
    for name in factors:
        if "lora_A" in name:
            partner = name.replace("lora_A", "lora_B")
        else:
            partner = name.replace("lora_B", "lora_A")
        if partner not in factors:
            raise ValueError(f"LoRA factor {name} has no matching {partner}")
    return [(name, name.replace("lora_A", "lora_B")) for name in factors if "lora_A" in name]


class SvdAvg(FedAvg):
    """FedAvg whose LoRA pairs get the rank-r SVD of their averaged product B @ A instead.

    `last_aggregation_errors` holds the round's `aggregation_error_svd` and
    `aggregation_error_fedavg` (empty when no reply could be aggregated).
    """

    def __init__(self, rank: int, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if rank < 1:
            raise ValueError(f"svd-avg needs a LoRA rank >= 1, got {rank}")
        self.rank = rank
        self.last_aggregation_errors: dict[str, float] = {}

    def summary(self) -> None:
        """Log FedAvg's summary and how the LoRA factors are aggregated."""
        super().summary()
        log(INFO, "\t└──> LoRA pairs: rank-%d SVD of the averaged B @ A", self.rank)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregation, with each LoRA pair replaced by its averaged product's SVD."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        self.last_aggregation_errors = {}
        if not valid_replies:
            return None, None

        contents = [msg.content for msg in valid_replies]
        fedavg_arrays = aggregate_arrayrecords(contents, self.weighted_by_key).to_torch_state_dict()
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        weights = self._weights(contents)
        # Replies were validated to hold exactly one ArrayRecord each, all with the same keys.
        clients = [next(iter(c.array_records.values())).to_torch_state_dict() for c in contents]

        svd_arrays: dict[str, Tensor] = {}
        svd_error_sq = fedavg_error_sq = norm_sq = 0.0
        for name_A, name_B in lora_pairs(clients[0]):
            shape_A, shape_B = clients[0][name_A].shape, clients[0][name_B].shape
            if shape_A[0] != self.rank:
                raise ValueError(f"{name_A} has rank {shape_A[0]}, svd-avg has rank {self.rank}")
            # Conv LoRA factors flatten to (r x in*k*k) and (out x r): B @ A is still the update.
            lora_A = [client[name_A].flatten(1) for client in clients]
            lora_B = [client[name_B].flatten(1) for client in clients]
            lora_A_agg, lora_B_agg = aggregate_lora_product(lora_A, lora_B, weights, self.rank)
            svd_arrays[name_A] = lora_A_agg.reshape(shape_A)
            svd_arrays[name_B] = lora_B_agg.reshape(shape_B)

            error_sq, norm_sq_pair = product_error(lora_A, lora_B, weights, lora_A_agg, lora_B_agg)
            fedavg_A, fedavg_B = fedavg_arrays[name_A].flatten(1), fedavg_arrays[name_B].flatten(1)
            svd_error_sq += error_sq
            fedavg_error_sq += product_error(lora_A, lora_B, weights, fedavg_A, fedavg_B)[0]
            norm_sq += norm_sq_pair

        # Pooled over all adapted matrices; 0 when there is nothing to approximate.
        norm = math.sqrt(norm_sq) or 1.0
        self.last_aggregation_errors = {
            "aggregation_error_svd": math.sqrt(svd_error_sq) / norm,
            "aggregation_error_fedavg": math.sqrt(fedavg_error_sq) / norm,
        }
        # The received key order and shapes; the head and other tensors as FedAvg averaged them.
        arrays = ArrayRecord({k: svd_arrays.get(k, fedavg_arrays[k]) for k in clients[0]})
        metrics.update(self.last_aggregation_errors)
        return arrays, metrics

    def _weights(self, contents: list[RecordDict]) -> list[float]:
        """w_i = num-examples_i / total, read as flwr's `aggregate_arrayrecords` reads it."""
        counts = [
            float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents
        ]
        total = sum(counts)
        return [count / total for count in counts]
