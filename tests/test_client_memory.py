"""A lean ClientApp process: no `datasets` on a warm node cache, one copy of the base weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import write_toy_csv
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from federa_app.config import parse_run_config
from federa_app.data import loading
from federa_app.federation.client import handle_train
from federa_app.federation.server import make_train_config
from federa_app.federation.wire import INIT_FACTORS_KEY, NODE_REPORT_KEY
from federa_app.method import models
from federa_app.method.models import build_model, initial_factors, trainable_state

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("negative", "positive")

# A fresh process handles one message as Flower's `flwr-clientapp` does (it is named so): what
# it imported and whether it kept a cached pre-trained model, then its reply as a protobuf.
CLIENT_PROCESS = """
import json, sys
sys.argv[0] = "flwr-clientapp"
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from federa_app.federation.client import handle_train
from federa_app.method import models
work = Path(sys.argv[2])
spec = json.loads((work / "spec.json").read_text())
msg = message_from_proto(ProtoMessage.FromString((work / "message.pb").read_bytes()))
context = Context(1, 11, spec["node_config"], RecordDict(), spec["run_config"])
reply = handle_train(msg, context)
(work / "reply.pb").write_bytes(message_to_proto(reply).SerializeToString())
heavy = sorted(m for m in ("datasets", "pandas", "pyarrow", "flwr_datasets") if m in sys.modules)
print(json.dumps({"heavy": heavy, "cached_models": models.pretrained_model.cache_info().currsize}))
"""


def test_a_warm_message_process_skips_datasets_and_keeps_one_model_copy(
    tmp_path, tiny_bert, server_identity, monkeypatch
):
    monkeypatch.setenv(loading.NODE_CACHE_ENV, str(tmp_path / "cache"))
    config = {
        "model": str(tiny_bert), "dataset": "csv:/not/on/this/node.csv", "method": "federa",
        "lora-rank": 2, "local-steps": 2, "batch-size": 8, "num-threads": 1,
    }  # fmt: skip
    cfg = parse_run_config(config)
    node_config = {"data": f"csv:{write_toy_csv(tmp_path / 'node.csv', rows=30)}"}
    loading.cached_node_train_data(node_config, cfg, LABELS)  # the node's first message did this

    factors = initial_factors(cfg, str(tiny_bert), LABELS)  # the server's part
    model = build_model(cfg, str(tiny_bert), LABELS, factors)
    train_config = make_train_config(LABELS)
    train_config["server-round"] = 1
    content = RecordDict(
        {
            "arrays": ArrayRecord(trainable_state(model)),
            "config": train_config,
            INIT_FACTORS_KEY: ArrayRecord(factors),
        }
    )
    metadata = Metadata(1, "", 1, 11, "", "1", 0.0, 3600.0, "train")
    proto = message_to_proto(make_message(metadata, content)).SerializeToString()
    (tmp_path / "message.pb").write_bytes(proto)
    spec = {"node_config": node_config, "run_config": config}
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    done = subprocess.run(
        [sys.executable, "-c", CLIENT_PROCESS, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "cached_models": 0}
    reply = message_from_proto(ProtoMessage.FromString((tmp_path / "reply.pb").read_bytes()))
    assert reply.content["metrics"]["num-examples"] == 30

    # This long-lived process copies its cached model: the very same tensors come back.
    here = handle_train(message_from_proto(ProtoMessage.FromString(proto)), Context(
        1, 11, node_config, RecordDict(), config
    ))  # fmt: skip
    theirs = reply.content["arrays"].to_torch_state_dict()
    ours = here.content["arrays"].to_torch_state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[n], ours[n]) for n in ours)
    digest = reply.content[NODE_REPORT_KEY]["residual-sha256"]
    assert digest and digest == here.content[NODE_REPORT_KEY]["residual-sha256"]


def test_keeping_the_pretrained_model_is_per_process_and_switchable(tiny_bert, monkeypatch):
    assert models.keeps_pretrained()  # pytest: a long-lived process
    monkeypatch.setattr(sys, "argv", ["/usr/bin/flwr-clientapp", "--insecure"])
    assert not models.keeps_pretrained()  # Flower's process per message
    monkeypatch.setattr(models, "KEEP_PRETRAINED", True)  # e.g. a warm worker named otherwise
    assert models.keeps_pretrained()

    monkeypatch.setattr(models, "KEEP_PRETRAINED", False)
    models.pretrained_model.cache_clear()
    loaded = models.load_base_model(str(tiny_bert), LABELS, 7)
    assert models.pretrained_model.cache_info().currsize == 0  # nothing kept
    monkeypatch.setattr(models, "KEEP_PRETRAINED", True)
    copied = models.load_base_model(str(tiny_bert), LABELS, 7)
    assert models.pretrained_model.cache_info().currsize == 1
    assert copied is not models.pretrained_model(str(tiny_bert), LABELS, 7)  # a copy to change
    a, b = loaded.state_dict(), copied.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same head too


def test_a_train_message_of_a_fresh_node_still_reads_its_file(tmp_path, tiny_bert, server_identity):
    """Cold cache in this process (datasets loaded lazily): the same rows as the warm path."""
    config = {"model": str(tiny_bert), "method": "lora", "lora-rank": 2, "local-steps": 1}
    node_config = {"data": f"csv:{write_toy_csv(tmp_path / 'node.csv', rows=12)}"}
    cfg = parse_run_config(config)
    cold = loading.cached_node_train_data(node_config, cfg, LABELS)
    warm = loading.cached_node_train_data(node_config, cfg, LABELS)
    assert cold.to_dict() == warm.to_dict() and len(warm) == 12
    model = build_model(cfg, str(tiny_bert), LABELS)
    content = RecordDict(
        {"arrays": ArrayRecord(trainable_state(model)), "config": make_train_config(LABELS)}
    )
    msg = Message(content, dst_node_id=11, message_type="train")
    reply = handle_train(msg, Context(1, 11, node_config, RecordDict(), config))
    assert reply.content["metrics"]["num-examples"] == 12
