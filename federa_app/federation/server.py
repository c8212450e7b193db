"""The ServerApp's work: check the input, prepare (resume, FeDeRA's SVD), run the rounds, finish.

The rounds themselves are the round engine's (`rounds.run_round`); here is what comes before the
first one (`prepare`: every input check, the run directory, the model, round 0 or the resumed
state) and after the last (`finish`: the exported model, the plot, summary.json).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid

from federa_app.config import Partitioning, RunConfig, parse_run_config
from federa_app.data import loading
from federa_app.errors import ConfigError
from federa_app.federation import checkpoint
from federa_app.federation.client import TRAIN_METRIC_KEYS
from federa_app.federation.privacy import (
    dp_reply_metric_keys,
    dp_settings,
    sampled_per_round,
    with_dp,
)
from federa_app.federation.rounds import (
    ServerRun,
    evaluate_round,
    record,
    run_round,
    save_checkpoint,
)
from federa_app.federation.strategies import (
    build_strategy,
    check_node_count,
    resolved_parameters,
    strategy_settings,
)
from federa_app.federation.validation import reject_reason
from federa_app.federation.wire import WireRecorder
from federa_app.method.models import (
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
from federa_app.method.training import set_threads
from federa_app.records.edge import TARGET_FIELDS, EdgeLink, time_to_target
from federa_app.records.run_dir import PLOT_FILE, WIRE_FILE, RunDirectory, plot_accuracy
from federa_app.records.updates import effective_weights


def run_server(grid: Grid, context: Context) -> None:
    """Run one federated fine-tuning job (or continue one, `resume-from`); write its run dir."""
    run = prepare(grid, context)
    for server_round in range(run.first_round, run.cfg.num_server_rounds + 1):
        run_round(run, server_round)
    finish(run)


@dataclass
class Inputs:
    """What the checks found: the checkpoint to resume (if any), the model and the data."""

    resumed: checkpoint.Checkpoint | None
    model_ref: str
    train: Any  # datasets.Dataset
    test: Any  # the evaluation rows (eval-max-examples of the test split)
    labels: tuple[str, ...]
    num_nodes: int


def prepare(grid: Grid, context: Context) -> ServerRun:
    """Everything before round 1: input checks, the run directory, the model (FeDeRA's SVD or
    the checkpoint's factors), config.json, and round 0 evaluated or the resumed state restored."""
    started = time.perf_counter()
    cfg = parse_run_config(context.run_config)
    random.seed(cfg.seed)  # Flower samples nodes with the global `random`
    np.random.seed(cfg.seed)  # Flower's DP wrappers draw their noise from numpy's
    set_threads(cfg)
    inputs = check_inputs(grid, cfg)
    base_strategy = build_strategy(cfg)
    strategy = with_dp(base_strategy, cfg, sampled_per_round(cfg, inputs.num_nodes))
    resumed = inputs.resumed
    if resumed is None:
        run_dir = RunDirectory.create(cfg, context.run_id)
    else:
        run_dir = RunDirectory.reopen(Path(cfg.resume_from), resumed.round, resumed.rows)
        checkpoint.restore_strategy_state(strategy, resumed.strategy_state)
    log(logging.INFO, "federa: run directory %s", run_dir.path)
    model, factors, svd_seconds = initialise_model(cfg, inputs)
    majority_rate = Counter(inputs.test["label"]).most_common(1)[0][1] / len(inputs.test)
    run_dir.write_config(
        {
            **cfg.to_dict(),
            "model-path": inputs.model_ref,
            "resolved-target-modules": (
                target_modules(cfg, inputs.model_ref) if cfg.uses_lora else []
            ),
            "strategy-settings": strategy_settings(base_strategy, cfg.strategy),
            "strategy-settings-source": resolved_parameters(cfg)[1],
            "labels": list(inputs.labels),
            "num-nodes": inputs.num_nodes,
            "train-examples": len(inputs.train),
            "test-examples": len(inputs.test),
            "majority-rate": majority_rate,
            "flwr-version": flwr.__version__,
            "torch-version": torch.__version__,
            "run-id": context.run_id,
        }
    )

    test_loader = loading.make_loader(
        inputs.test,
        load_tokenizer(inputs.model_ref),
        cfg.eval_batch_size,
        cfg.max_length,
        False,
        cfg.seed,
    )
    rows: list[dict] = list(resumed.rows) if resumed is not None else []
    run = ServerRun(
        cfg=cfg,
        model=model,
        labels=inputs.labels,
        factors=factors,
        base_strategy=base_strategy,
        strategy=strategy,
        wire=recording_wire(grid, cfg, factors, run_dir, rows),
        run_dir=run_dir,
        test_loader=test_loader,
        train_config=make_train_config(inputs.labels),
        link=EdgeLink(cfg.device_slowdown, cfg.uplink_mbps, cfg.downlink_mbps),
        num_nodes=inputs.num_nodes,
        majority_rate=majority_rate,
        started=started,
        svd_seconds=svd_seconds,
        rows=rows,
    )
    if resumed is None:
        run.arrays = ArrayRecord(trainable_state(model))
        record(run, evaluate_round(run, 0, counted=True))
        save_checkpoint(run, 0)
    else:
        restore(run, resumed)
    return run


def check_inputs(grid: Grid, cfg: RunConfig) -> Inputs:
    """Everything that can be wrong with the input, checked before any training starts."""
    resumed = checkpoint.load(Path(cfg.resume_from)) if cfg.resume_from else None
    if resumed is not None:
        checkpoint.check_resumable(resumed, cfg)
    model_ref = resolve_model(cfg.model)
    train, test, labels = loading.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    if 0 < cfg.eval_max_examples < len(test):  # a fixed, seeded subset: same for every method
        test = test.shuffle(seed=cfg.seed).select(range(cfg.eval_max_examples))
    check_model_fits(cfg, model_ref, len(labels))
    num_nodes = len(list(grid.get_node_ids()))
    if num_nodes:
        loading.partition_sizes(train, Partitioning.of(cfg, num_nodes))
        check_node_count(cfg, num_nodes, sampled_per_round(cfg, num_nodes))
    return Inputs(resumed, model_ref, train, test, labels, num_nodes)


def initialise_model(
    cfg: RunConfig, inputs: Inputs
) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None, float]:
    """The server's model: FeDeRA's SVD factors computed (or the checkpoint's), the method's
    trainable tensors built; returns it with the factors and the SVD's seconds."""
    pretrained_model(inputs.model_ref, inputs.labels, cfg.seed)  # load once: time the SVD alone
    svd_start = time.perf_counter()
    if inputs.resumed is not None:
        factors, svd_seconds = inputs.resumed.factors, inputs.resumed.svd_seconds
    else:
        factors = (
            initial_factors(cfg, inputs.model_ref, inputs.labels) if cfg.uses_svd_init else None
        )
        svd_seconds = time.perf_counter() - svd_start
    return build_model(cfg, inputs.model_ref, inputs.labels, factors), factors, svd_seconds


def recording_wire(
    grid: Grid,
    cfg: RunConfig,
    factors: dict[str, torch.Tensor] | None,
    run_dir: RunDirectory,
    rows: list[dict],
) -> WireRecorder:
    """The grid, wrapped: counts bytes, validates every reply, logs messages (wire-log)."""

    def log_message(message: dict) -> None:
        with open(run_dir.path / WIRE_FILE, "a") as f:
            f.write(json.dumps({"round": len(rows), **message}) + "\n")

    metric_keys = TRAIN_METRIC_KEYS + dp_reply_metric_keys(cfg)
    return WireRecorder(
        grid,
        ArrayRecord(factors) if factors is not None else None,
        on_message=log_message if cfg.wire_log else None,
        check=lambda reply, sent: reject_reason(reply, sent, metric_keys, cfg.max_update_norm),
    )


def restore(run: ServerRun, resumed: checkpoint.Checkpoint) -> None:
    """Continue after the checkpoint's round: its arrays, update history and random state."""
    run.wall_before, run.first_round = resumed.wall_seconds, resumed.round + 1
    run.resumed_after = [*resumed.resumed_after, resumed.round]
    run.arrays = ArrayRecord(resumed.arrays)
    run.previous = ArrayRecord(resumed.previous_arrays) if resumed.previous_arrays else None
    for state in (run.previous, run.arrays):  # the update tracker sees the rounds it missed
        if state is not None:
            load_trainable_state(run.model, state.to_torch_state_dict())
            run.updates.observe(effective_weights(run.model))
    checkpoint.restore_rng(resumed.rng)  # last: loading and building drew from them
    run.any_counted = any(r["counted"] for r in run.rows[1:])
    log(logging.INFO, "federa: resuming after round %d", resumed.round)


def finish(run: ServerRun) -> None:
    """After the last round: the final model (adapter/), the accuracy plot and summary.json."""
    cfg, rows = run.cfg, run.rows
    load_trainable_state(run.model, run.arrays.to_torch_state_dict())
    save_final_model(run.model, cfg, run.run_dir.adapter_dir, run.factors)
    write_labels(run.run_dir.adapter_dir, run.labels)
    plot_accuracy(
        rows,
        run.run_dir.path / PLOT_FILE,
        f"{cfg.method} on {cfg.dataset} ({cfg.strategy}, {run.num_nodes} nodes)",
        run.majority_rate,
    )
    trainable, total = count_params(run.model)
    run.run_dir.write_summary(
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
            "majority_rate": run.majority_rate,
            "trainable_params": trainable,
            "total_params": total,
            "bytes_up_total": sum(r["bytes_up"] for r in rows),
            "bytes_down_total": sum(r["bytes_down"] for r in rows),
            "failures_total": sum(r["failures"] for r in rows),
            "rejected_total": sum(r["rejected"] for r in rows),
            "rounds_not_counted": [r["round"] for r in rows[1:] if not r["counted"]],
            "failures_by_round": failures_by_round(rows),
            "learning_rate": cfg.learning_rate,
            **dp_settings(run.strategy, cfg),
            "max_update_norm": cfg.max_update_norm,
            "resumed_after_rounds": run.resumed_after,
            "svd_seconds": run.svd_seconds,
            "edge_seconds_total": sum(r["edge_seconds"] for r in rows),
            "target_accuracy": cfg.target_accuracy,
            **(time_to_target(rows, cfg.target_accuracy, run.link) or dict.fromkeys(TARGET_FIELDS)),
            "wall_seconds": run.wall_seconds(),
            "run_dir": str(run.run_dir.path),
        }
    )
    log(logging.INFO, "federa: finished, run directory %s", run.run_dir.path)


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
    return ConfigRecord({loading.LABELS_KEY: [str(name) for name in labels]})


def check_before_start(cfg: RunConfig, num_clients: int) -> None:
    """Everything checkable before a process starts: model, dataset, rank, node counts, partitions.

    What the ServerApp would refuse, for `federa simulate`, `federa deploy` and the harness.
    """
    needed = max(cfg.min_train_nodes, cfg.min_available_nodes)
    if num_clients < max(needed, 1):
        raise ConfigError(
            f"--num-clients {num_clients} is below min-train-nodes/min-available-nodes "
            f"({needed}): use more clients or lower those keys"
        )
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # building it logs "federated evaluation skipped"
    try:
        # Fails on a strategy parameter the strategy lacks, or DP settings Flower refuses.
        with_dp(build_strategy(cfg), cfg, sampled_per_round(cfg, num_clients))
        check_node_count(cfg, num_clients, sampled_per_round(cfg, num_clients))
    finally:
        flwr_logger.setLevel(level)
    model_ref = resolve_model(cfg.model)
    loading.validate_dataset_name(cfg.dataset)
    train, _, labels = loading.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    check_model_fits(cfg, model_ref, len(labels))
    loading.partition_sizes(train, Partitioning.of(cfg, num_clients))
