"""The ServerApp's work: validate, initialise (FeDeRA's SVD), run the strategy, evaluate, record."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from federa_app import data
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
from federa_app.records import PLOT_FILE, RunDirectory, plot_accuracy
from federa_app.strategies import build_strategy, strategy_settings
from federa_app.training import evaluate, set_threads
from federa_app.updates import UpdateTracker, effective_weights
from federa_app.wire import Traffic, WireRecorder

PROGRESS_PREFIX = "federa-round"


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
        "client_seconds_max": max(client_seconds, default=0.0),
        "client_seconds_sum": sum(client_seconds),
        "round_seconds": seconds,
        "eval_seconds": eval_seconds,
        "aggregation_seconds": aggregation_seconds,
        "client_costs": traffic.client_costs,
    }


def make_train_config(labels: tuple[str, ...] | list[str]) -> ConfigRecord:
    """The train config every node gets: the label names, so a node's own data maps onto ids."""
    return ConfigRecord({data.LABELS_KEY: [str(name) for name in labels]})


def run_server(grid: Grid, context: Context) -> None:
    """Run one federated fine-tuning job and write its run directory."""
    started = time.perf_counter()
    cfg = parse_run_config(context.run_config)
    random.seed(cfg.seed)  # Flower samples nodes with the global `random`
    set_threads(cfg)

    # Everything that can be wrong with the input is checked before any training starts.
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
    strategy = build_strategy(cfg)
    run_dir = RunDirectory.create(cfg, context.run_id)
    log(logging.INFO, "federa: run directory %s", run_dir.path)

    pretrained_model(model_ref, labels, cfg.seed)  # load once, so svd_seconds is the SVD alone
    svd_start = time.perf_counter()
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
            "strategy-settings": strategy_settings(strategy, cfg.strategy),
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
    rows: list[dict] = []

    def log_message(record: dict) -> None:
        with open(run_dir.path / "wire.jsonl", "a") as f:
            f.write(json.dumps({"round": len(rows), **record}) + "\n")

    wire = WireRecorder(
        grid,
        ArrayRecord(factors) if factors is not None else None,
        on_message=log_message if cfg.wire_log else None,
    )
    link = EdgeLink(cfg.device_slowdown, cfg.uplink_mbps, cfg.downlink_mbps)
    updates = UpdateTracker()
    clock = [time.perf_counter()]

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
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
        row["edge_seconds"] = edge_round_seconds(row, link)
        row.update(update)
        if server_round > 0:  # svd-avg reports how far its and FedAvg's aggregates are from exact
            row.update(getattr(strategy, "last_aggregation_errors", {}))
        rows.append(row)
        run_dir.append_metrics(row)
        log(logging.INFO, "%s %s", PROGRESS_PREFIX, row)
        for node, reason in traffic.failures:
            log(logging.WARNING, "federa: round %d node %d failed: %s", server_round, node, reason)
        if server_round > 0 and row["clients"] == 0:
            reason = traffic.failures[0][1] if traffic.failures else "no node was sampled"
            raise RuntimeError(f"round {server_round} got no results: {reason}")
        clock[0] = time.perf_counter()
        return MetricRecord({k: scores[k] for k in ("accuracy", "macro_f1", "loss")})

    result = strategy.start(
        grid=wire,
        initial_arrays=ArrayRecord(trainable_state(model)),
        num_rounds=cfg.num_server_rounds,
        train_config=make_train_config(labels),
        evaluate_fn=evaluate_round,
    )

    load_trainable_state(model, result.arrays.to_torch_state_dict())
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
            "learning_rate": cfg.learning_rate,
            "svd_seconds": svd_seconds,
            "edge_seconds_total": sum(r["edge_seconds"] for r in rows),
            "target_accuracy": cfg.target_accuracy,
            **(time_to_target(rows, cfg.target_accuracy, link) or dict.fromkeys(TARGET_FIELDS)),
            "wall_seconds": time.perf_counter() - started,
            "run_dir": str(run_dir.path),
        }
    )
    log(logging.INFO, "federa: finished, run directory %s", run_dir.path)
