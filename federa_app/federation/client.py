"""The ClientApp's work: rebuild the model from what the server sent, train locally, reply."""

from __future__ import annotations

import os
import platform
import time

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from federa_app.config import RunConfig, parse_run_config
from federa_app.data import loading
from federa_app.federation.wire import INIT_FACTORS_KEY, NODE_REPORT_KEY
from federa_app.method.federa_init import residual_digest
from federa_app.method.models import (
    build_model,
    load_tokenizer,
    load_trainable_state,
    per_message_process,
    resolve_model,
    trainable_state,
)
from federa_app.method.training import check_precision, set_threads, train_device, train_locally

# The MetricRecord of every train reply; the server rejects a reply whose keys differ.
TRAIN_METRIC_KEYS = (
    "num-examples",
    "train_loss",
    "train_seconds",
    "client_seconds",
    "partition-id",
    "num-threads",
)


def initial_factors_for(msg: Message, context: Context) -> dict:
    """FeDeRA's (A0, B0): from this message (then kept in the node's state) or from that state."""
    if INIT_FACTORS_KEY in msg.content:
        context.state[INIT_FACTORS_KEY] = msg.content[INIT_FACTORS_KEY]
    if INIT_FACTORS_KEY not in context.state:
        raise RuntimeError(
            "method federa: this node holds no initial factors and the server sent none "
            "(node state lost?)"
        )
    return context.state[INIT_FACTORS_KEY].to_torch_state_dict()


def node_report(model, cfg: RunConfig) -> ConfigRecord:  # noqa: ANN001 - any torch model
    """What the node is and what it trained on: machine, Python, user, FeDeRA residual digest.

    The server records it per node (metrics.jsonl `nodes`) and strips it before aggregation. The
    residual digest shows that every node, whatever its CPU, trains on the same frozen W_res.
    """
    report = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # TorchVersion would not load from a checkpoint
        "uid": os.getuid() if hasattr(os, "getuid") else -1,
        "residual-sha256": residual_digest(model) if cfg.uses_svd_init else "",
    }
    if per_message_process():
        report["process-seconds"] = process_age()
    return ConfigRecord(report)


def process_age() -> float:
    """Seconds since this process started (interpreter start, imports and all)."""
    return max(time.time() - psutil.Process().create_time(), 0.0)


def server_labels(msg: Message, cfg: RunConfig) -> tuple[str, ...]:
    """The server's label names from the train config; from the run's dataset if it sent none."""
    sent = msg.content["config"].get(loading.LABELS_KEY)
    if sent is not None:
        return tuple(str(name) for name in sent)
    return tuple(loading.load_labelled(cfg.dataset)[1])


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global tensors on this node's data; reply with the new tensors."""
    started = time.perf_counter()
    cfg = parse_run_config(context.run_config)
    device = train_device()
    check_precision(cfg.precision, device)  # before any data or model is loaded
    threads = set_threads(cfg)
    partition_id = loading.node_partition_id(context.node_config)  # -1: the node's own file
    server_round = int(msg.content["config"].get("server-round", 0))

    model_ref = resolve_model(cfg.model)
    labels = server_labels(msg, cfg)
    rows = loading.cached_node_train_data(context.node_config, cfg, labels)
    factors = initial_factors_for(msg, context) if cfg.uses_svd_init else None
    model = build_model(cfg, model_ref, labels, factors)
    load_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
    model.to(device)

    loader = loading.make_loader(
        rows,
        load_tokenizer(model_ref),
        cfg.batch_size,
        cfg.max_length,
        shuffle=True,
        seed=cfg.seed * 100_003 + server_round * 1_009 + max(partition_id, 0),
    )
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    stats = train_locally(model, loader, cfg, proximal_mu=proximal_mu)
    model.to("cpu")  # what is sent back and reported is read from CPU tensors
    metrics = MetricRecord(
        {
            "num-examples": len(rows),
            "train_loss": stats["train_loss"],
            "train_seconds": stats["train_seconds"],
            "client_seconds": time.perf_counter() - started,
            "partition-id": partition_id,
            "num-threads": threads,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(trainable_state(model)),
            "metrics": metrics,
            NODE_REPORT_KEY: node_report(model, cfg),
        }
    )
    return Message(content=content, reply_to=msg)
