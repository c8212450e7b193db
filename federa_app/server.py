"""The ServerApp's work: validate, initialise (FeDeRA's SVD), run the strategy, evaluate, record."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

import flwr
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid

from federa_app import checkpoint, data
from federa_app.client import TRAIN_METRIC_KEYS
from federa_app.config import parse_run_config
from federa_app.edge import TARGET_FIELDS, EdgeLink, edge_round_seconds, time_to_target
from federa_app.models import (
    build_model,
    check_model_fits,
    count_params,
    initial_factors,
    load_tokenizer,
    load_trainable_state,
    pretrained_model,
    resolve_model,
    save_final_model,
    target_modules,
    trainable_state,
    write_labels,
)
from federa_app.privacy import dp_reply_metric_keys, dp_settings, sampled_per_round, with_dp
from federa_app.records import PLOT_FILE, WIRE_FILE, RunDirectory, plot_accuracy
from federa_app.strategies import (
    build_strategy,
    check_node_count,
    resolved_parameters,
    strategy_settings,
)
from federa_app.training import evaluate, set_threads
from federa_app.updates import UpdateTracker, effective_weights
from federa_app.validation import reject_reason
from federa_app.wire import Traffic, WireRecorder

PROGRESS_PREFIX = "federa-round"
ROUND_TIMEOUT = 3600.0  # seconds to wait for a round's replies (Flower's own default)


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


def failures_by_round(rows: list[dict]) -> list[dict]:
    """The summary's list of rounds where nodes failed or replies were rejected, and why."""
    return [
        {
            "round": r["round"],
            "counted": r["counted"],
            "failed": r["failed_nodes"],
            "rejected": r["rejected_nodes"],
        }
        for r in rows
        if r["failed_nodes"] or r["rejected_nodes"]
    ]


def make_train_config(labels: tuple[str, ...] | list[str]) -> ConfigRecord:
    """The train config every node gets: the label names, so a node's own data maps onto ids."""
    return ConfigRecord({data.LABELS_KEY: [str(name) for name in labels]})


def run_server(grid: Grid, context: Context) -> None:
    """Run one federated fine-tuning job (or continue one, `resume-from`); write its run dir."""
    started = time.perf_counter()
    cfg = parse_run_config(context.run_config)
    random.seed(cfg.seed)  # Flower samples nodes with the global `random`
    np.random.seed(cfg.seed)  # Flower's DP wrappers draw their noise from numpy's
    set_threads(cfg)

    # Everything that can be wrong with the input is checked before any training starts.
    resumed = checkpoint.load(Path(cfg.resume_from)) if cfg.resume_from else None
    if resumed is not None:
        checkpoint.check_resumable(resumed, cfg)
    model_ref = resolve_model(cfg.model)
    train, test, labels = data.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    if 0 < cfg.eval_max_examples < len(test):  # a fixed, seeded subset: same for every method
        test = test.shuffle(seed=cfg.seed).select(range(cfg.eval_max_examples))
    check_model_fits(cfg, model_ref, len(labels))
    num_nodes = len(list(grid.get_node_ids()))
    if num_nodes:
        data.partition_sizes(
            train,
            cfg.partitioner,
            num_nodes,
            cfg.seed,
            cfg.dirichlet_alpha,
            cfg.classes_per_client,
        )
    if num_nodes:
        check_node_count(cfg, num_nodes, sampled_per_round(cfg, num_nodes))
    base_strategy = build_strategy(cfg)
    strategy = with_dp(base_strategy, cfg, sampled_per_round(cfg, num_nodes))
    if resumed is None:
        run_dir = RunDirectory.create(cfg, context.run_id)
    else:
        run_dir = RunDirectory.reopen(Path(cfg.resume_from), resumed.round, resumed.rows)
        checkpoint.restore_strategy_state(strategy, resumed.strategy_state)
    log(logging.INFO, "federa: run directory %s", run_dir.path)

    pretrained_model(model_ref, labels, cfg.seed)  # load once, so svd_seconds is the SVD alone
    svd_start = time.perf_counter()
    if resumed is not None:
        factors, svd_seconds = resumed.factors, resumed.svd_seconds
    else:
        factors = initial_factors(cfg, model_ref, labels) if cfg.uses_svd_init else None
        svd_seconds = time.perf_counter() - svd_start
    model = build_model(cfg, model_ref, labels, factors)
    trainable, total = count_params(model)
    majority_rate = Counter(test["label"]).most_common(1)[0][1] / len(test)
    run_dir.write_config(
        {
            **cfg.to_dict(),
            "model-path": model_ref,
            "resolved-target-modules": target_modules(cfg, model_ref) if cfg.uses_lora else [],
            "strategy-settings": strategy_settings(base_strategy, cfg.strategy),
            "strategy-settings-source": resolved_parameters(cfg)[1],
            "labels": list(labels),
            "num-nodes": num_nodes,
            "train-examples": len(train),
            "test-examples": len(test),
            "majority-rate": majority_rate,
            "flwr-version": flwr.__version__,
            "torch-version": torch.__version__,
            "run-id": context.run_id,
        }
    )

    test_loader = data.make_loader(
        test, load_tokenizer(model_ref), cfg.eval_batch_size, cfg.max_length, False, cfg.seed
    )
    rows: list[dict] = list(resumed.rows) if resumed is not None else []

    def log_message(record: dict) -> None:
        with open(run_dir.path / WIRE_FILE, "a") as f:
            f.write(json.dumps({"round": len(rows), **record}) + "\n")

    metric_keys = TRAIN_METRIC_KEYS + dp_reply_metric_keys(cfg)
    wire = WireRecorder(
        grid,
        ArrayRecord(factors) if factors is not None else None,
        on_message=log_message if cfg.wire_log else None,
        check=lambda reply, sent: reject_reason(reply, sent, metric_keys, cfg.max_update_norm),
    )
    link = EdgeLink(cfg.device_slowdown, cfg.uplink_mbps, cfg.downlink_mbps)
    updates = UpdateTracker()
    clock = [time.perf_counter()]

    def evaluate_round(server_round: int, arrays: ArrayRecord, counted: bool) -> dict:
        eval_start = time.perf_counter()
        traffic = wire.next_round()
        # Aggregation: from the last reply to here (the strategy's aggregate_train runs between).
        aggregation = eval_start - traffic.replies_at if traffic.replies_at else 0.0
        load_trainable_state(model, arrays.to_torch_state_dict())
        update = updates.observe(effective_weights(model))
        scores = evaluate(model, test_loader, len(labels))
        now = time.perf_counter()
        row = round_row(
            server_round, scores, traffic, now - clock[0], now - eval_start, aggregation
        )
        row["counted"] = counted
        row["edge_seconds"] = edge_round_seconds(row, link)
        row.update(update)
        if server_round > 0 and counted:  # svd-avg: how far its and FedAvg's aggregates are
            row.update(getattr(base_strategy, "last_aggregation_errors", {}))
        rows.append(row)
        run_dir.append_metrics(row)
        log(logging.INFO, "%s %s", PROGRESS_PREFIX, row)
        clock[0] = time.perf_counter()
        return row

    def save_checkpoint(
        server_round: int, arrays: ArrayRecord, previous: ArrayRecord | None
    ) -> None:
        checkpoint.save(
            run_dir.path,
            checkpoint.Checkpoint(
                round=server_round,
                arrays=arrays.to_torch_state_dict(),
                previous_arrays=previous.to_torch_state_dict() if previous is not None else None,
                strategy_state=checkpoint.strategy_state(strategy),
                rng=checkpoint.rng_state(),
                rows=rows,
                factors=factors,
                config=cfg.to_dict(),
                wall_seconds=wall_before + time.perf_counter() - started,
                svd_seconds=svd_seconds,
                resumed_after=resumed_after,
            ),
        )

    if resumed is None:
        wall_before, first_round, resumed_after = 0.0, 1, []
        arrays, previous = ArrayRecord(trainable_state(model)), None
        evaluate_round(0, arrays, counted=True)
        save_checkpoint(0, arrays, None)
    else:
        wall_before, first_round = resumed.wall_seconds, resumed.round + 1
        resumed_after = [*resumed.resumed_after, resumed.round]
        arrays = ArrayRecord(resumed.arrays)
        previous = ArrayRecord(resumed.previous_arrays) if resumed.previous_arrays else None
        for state in (previous, arrays):  # the update tracker sees the rounds it missed
            if state is not None:
                load_trainable_state(model, state.to_torch_state_dict())
                updates.observe(effective_weights(model))
        checkpoint.restore_rng(resumed.rng)  # last: loading and building drew from them
        log(logging.INFO, "federa: resuming after round %d", resumed.round)

    any_counted = any(r["counted"] for r in rows[1:])
    train_config = make_train_config(labels)
    # Flower's Strategy.start always begins at round 1 and aggregates whatever it gets; our loop
    # can start after a checkpoint and decides itself whether a round counts (min-train-nodes).
    for server_round in range(first_round, cfg.num_server_rounds + 1):
        log(logging.INFO, "[ROUND %s/%s]", server_round, cfg.num_server_rounds)
        messages = strategy.configure_train(server_round, arrays, train_config, wire)
        replies = list(wire.send_and_receive(messages, timeout=ROUND_TIMEOUT))
        traffic = wire.traffic
        for what, entries in (("failed", traffic.failures), ("rejected", traffic.rejected)):
            for node, reason in entries:
                log(logging.WARNING, "federa: round %d node %d %s: %s", server_round, node, what,
                    reason)  # fmt: skip
        counted = len(replies) >= max(cfg.min_train_nodes, 1)
        if not counted and not replies and not any_counted and not traffic.rejected:
            # Every node failing before any round counted is a broken ClientApp, not bad luck.
            reason = traffic.failures[0][1] if traffic.failures else "no node was sampled"
            evaluate_round(server_round, arrays, counted=False)
            raise RuntimeError(f"round {server_round} got no results: {reason}")
        new_arrays = strategy.aggregate_train(server_round, replies)[0] if counted else None
        if new_arrays is None:
            log(
                logging.WARNING,
                "federa: round %d does not count (%d sound replies, min-train-nodes %d): "
                "the global model stays as it was",
                server_round,
                len(replies),
                cfg.min_train_nodes,
            )
            counted = False
        previous = arrays  # the update metrics compare with the last round, counted or not
        if new_arrays is not None:
            arrays, any_counted = new_arrays, True
        evaluate_round(server_round, arrays, counted)
        save_checkpoint(server_round, arrays, previous)

    load_trainable_state(model, arrays.to_torch_state_dict())
    save_final_model(model, cfg, run_dir.adapter_dir, factors)
    write_labels(run_dir.adapter_dir, labels)
    plot_accuracy(
        rows,
        run_dir.path / PLOT_FILE,
        f"{cfg.method} on {cfg.dataset} ({cfg.strategy}, {num_nodes} nodes)",
        majority_rate,
    )
    run_dir.write_summary(
        {
            "method": cfg.method,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "strategy": cfg.strategy,
            "rounds": cfg.num_server_rounds,
            "final_accuracy": rows[-1]["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in rows),
            "final_macro_f1": rows[-1]["macro_f1"],
            "initial_accuracy": rows[0]["accuracy"],
            "majority_rate": majority_rate,
            "trainable_params": trainable,
            "total_params": total,
            "bytes_up_total": sum(r["bytes_up"] for r in rows),
            "bytes_down_total": sum(r["bytes_down"] for r in rows),
            "failures_total": sum(r["failures"] for r in rows),
            "rejected_total": sum(r["rejected"] for r in rows),
            "rounds_not_counted": [r["round"] for r in rows[1:] if not r["counted"]],
            "failures_by_round": failures_by_round(rows),
            "learning_rate": cfg.learning_rate,
            **dp_settings(strategy, cfg),
            "max_update_norm": cfg.max_update_norm,
            "resumed_after_rounds": resumed_after,
            "svd_seconds": svd_seconds,
            "edge_seconds_total": sum(r["edge_seconds"] for r in rows),
            "target_accuracy": cfg.target_accuracy,
            **(time_to_target(rows, cfg.target_accuracy, link) or dict.fromkeys(TARGET_FIELDS)),
            "wall_seconds": wall_before + time.perf_counter() - started,
            "run_dir": str(run_dir.path),
        }
    )
    log(logging.INFO, "federa: finished, run directory %s", run_dir.path)
