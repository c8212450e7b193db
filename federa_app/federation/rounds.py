"""The round engine: the state every round shares, and one round as a row of named steps.

`run_round` reads configure -> send and receive -> validate -> aggregate -> evaluate -> record ->
checkpoint. The first two are the `Exchange`'s: a subclass can give each node a message of its
own (its own rank) or run a different exchange (SecAgg+'s stages) and hand back the replies, and
nothing else in the round changes. `server.prepare` builds the state; `server.finish` exports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from federa_app.config import RunConfig
from federa_app.federation import checkpoint
from federa_app.federation.wire import Traffic, WireRecorder
from federa_app.method.models import load_trainable_state
from federa_app.method.training import evaluate
from federa_app.records.edge import EdgeLink, edge_round_seconds
from federa_app.records.run_dir import RunDirectory
from federa_app.records.updates import UpdateTracker, effective_weights

PROGRESS_PREFIX = "federa-round"
ROUND_TIMEOUT = 3600.0  # seconds to wait for a round's replies (Flower's own default)


class Exchange:
    """Flower's train exchange: the strategy's messages out, the replies the wire accepted back."""

    def configure(self, run: ServerRun, server_round: int) -> Iterable[Message]:
        """This round's messages: the strategy samples the nodes and packs the global arrays."""
        return run.strategy.configure_train(server_round, run.arrays, run.train_config, run.wire)

    def send_and_receive(self, run: ServerRun, messages: Iterable[Message]) -> list[Message]:
        """Send and wait; the wire validates each reply and keeps only the sound ones."""
        return list(run.wire.send_and_receive(messages, timeout=ROUND_TIMEOUT))


@dataclass
class ServerRun:
    """What the rounds read and update, from `server.prepare` to `server.finish`."""

    cfg: RunConfig
    model: torch.nn.Module  # the server's copy: evaluates each round's global arrays
    labels: tuple[str, ...]
    factors: dict[str, torch.Tensor] | None  # FeDeRA's initial factors (checkpointed)
    base_strategy: Strategy  # as configured; svd-avg reports its aggregation errors on it
    strategy: Strategy  # base_strategy, wrapped for differential privacy when asked
    wire: WireRecorder
    run_dir: RunDirectory
    test_loader: Any
    train_config: ConfigRecord
    link: EdgeLink
    num_nodes: int
    majority_rate: float
    started: float  # perf_counter when this process began the run
    svd_seconds: float
    rows: list[dict]
    arrays: ArrayRecord | None = None  # the global trainable tensors
    previous: ArrayRecord | None = None  # the last round's, for the update metrics
    any_counted: bool = False
    first_round: int = 1
    wall_before: float = 0.0  # wall seconds of the run before a resume
    resumed_after: list[int] = field(default_factory=list)
    exchange: Exchange = field(default_factory=Exchange)
    updates: UpdateTracker = field(default_factory=UpdateTracker)
    round_started: float = field(default_factory=time.perf_counter)

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


def run_round(run: ServerRun, server_round: int) -> None:
    """One round. Flower's Strategy.start always begins at round 1 and aggregates whatever it
    gets; this loop can start after a checkpoint and decides itself whether a round counts."""
    log(logging.INFO, "[ROUND %s/%s]", server_round, run.cfg.num_server_rounds)
    messages = run.exchange.configure(run, server_round)
    replies = run.exchange.send_and_receive(run, messages)
    counted = enough_replies(run, server_round, replies)
    new_arrays = run.strategy.aggregate_train(server_round, replies)[0] if counted else None
    counted = advance(run, server_round, new_arrays, len(replies))
    record(run, evaluate_round(run, server_round, counted))
    save_checkpoint(run, server_round)


def enough_replies(run: ServerRun, server_round: int, replies: list[Message]) -> bool:
    """Whether the round counts (min-train-nodes sound replies); raise on a broken ClientApp."""
    traffic = run.wire.traffic
    for what, entries in (("failed", traffic.failures), ("rejected", traffic.rejected)):
        for node, reason in entries:
            log(logging.WARNING, "federa: round %d node %d %s: %s", server_round, node, what,
                reason)  # fmt: skip
    counted = len(replies) >= max(run.cfg.min_train_nodes, 1)
    if not counted and not replies and not run.any_counted and not traffic.rejected:
        # Every node failing before any round counted is a broken ClientApp, not bad luck.
        reason = traffic.failures[0][1] if traffic.failures else "no node was sampled"
        record(run, evaluate_round(run, server_round, counted=False))
        raise RuntimeError(f"round {server_round} got no results: {reason}")
    return counted


def advance(
    run: ServerRun, server_round: int, new_arrays: ArrayRecord | None, sound_replies: int
) -> bool:
    """Take the aggregate as the global model; without one the round does not count."""
    if new_arrays is None:
        log(
            logging.WARNING,
            "federa: round %d does not count (%d sound replies, min-train-nodes %d): "
            "the global model stays as it was",
            server_round,
            sound_replies,
            run.cfg.min_train_nodes,
        )
    run.previous = run.arrays  # the update metrics compare with the last round, counted or not
    if new_arrays is not None:
        run.arrays, run.any_counted = new_arrays, True
    return new_arrays is not None


def evaluate_round(run: ServerRun, server_round: int, counted: bool) -> dict:
    """The round's metrics row: the global model's server-side scores, traffic and timings."""
    eval_start = time.perf_counter()
    traffic = run.wire.next_round()
    # Aggregation: from the last reply to here (the strategy's aggregate_train runs between).
    aggregation = eval_start - traffic.replies_at if traffic.replies_at else 0.0
    load_trainable_state(run.model, run.arrays.to_torch_state_dict())
    update = run.updates.observe(effective_weights(run.model))
    scores = evaluate(run.model, run.test_loader, len(run.labels))
    now = time.perf_counter()
    row = round_row(
        server_round, scores, traffic, now - run.round_started, now - eval_start, aggregation
    )
    row["counted"] = counted
    row["edge_seconds"] = edge_round_seconds(row, run.link)
    row.update(update)
    if server_round > 0 and counted:  # svd-avg: how far its and FedAvg's aggregates are
        row.update(getattr(run.base_strategy, "last_aggregation_errors", {}))
    return row


def record(run: ServerRun, row: dict) -> None:
    """Append the row to metrics.jsonl and print it as the progress line `federa` follows."""
    run.rows.append(row)
    run.run_dir.append_metrics(row)
    log(logging.INFO, "%s %s", PROGRESS_PREFIX, row)
    run.round_started = time.perf_counter()


def save_checkpoint(run: ServerRun, server_round: int) -> None:
    """Everything the next round depends on, so a killed run resumes after this one."""
    checkpoint.save(
        run.run_dir.path,
        checkpoint.Checkpoint(
            round=server_round,
            arrays=run.arrays.to_torch_state_dict(),
            previous_arrays=(
                run.previous.to_torch_state_dict() if run.previous is not None else None
            ),
            strategy_state=checkpoint.strategy_state(run.strategy),
            rng=checkpoint.rng_state(),
            rows=run.rows,
            factors=run.factors,
            config=run.cfg.to_dict(),
            wall_seconds=run.wall_seconds(),
            svd_seconds=run.svd_seconds,
            resumed_after=run.resumed_after,
        ),
    )


def round_row(
    server_round: int,
    scores: dict,
    traffic: Traffic,
    seconds: float,
    eval_seconds: float,
    aggregation_seconds: float,
) -> dict:
    """One metrics.jsonl row: server-side scores, client-reported train loss and timings, bytes."""
    replies = traffic.reply_metrics
    examples = sum(m.get("num-examples", 0) for m in replies)
    train_loss = (
        sum(m["train_loss"] * m["num-examples"] for m in replies) / examples if examples else None
    )
    client_seconds = [m.get("client_seconds", 0.0) for m in replies]
    return {
        "round": server_round,
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "loss": scores["loss"],
        "train_loss": train_loss,
        "bytes_up": traffic.bytes_up,
        "bytes_down": traffic.bytes_down,
        "clients": len(replies),
        "failures": len(traffic.failures),
        "failed_nodes": [[node, reason] for node, reason in traffic.failures],
        "rejected": len(traffic.rejected),
        "rejected_nodes": [[node, reason] for node, reason in traffic.rejected],
        "client_seconds_max": max(client_seconds, default=0.0),
        "client_seconds_sum": sum(client_seconds),
        "round_seconds": seconds,
        "eval_seconds": eval_seconds,
        "aggregation_seconds": aggregation_seconds,
        "client_costs": traffic.client_costs,
        "nodes": traffic.nodes,
    }
