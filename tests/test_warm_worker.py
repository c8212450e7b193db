"""The node-local warm worker (`federa worker`): the same reply and node state as the in-process
handler, a ClientApp process that never imports torch, and clean fallbacks."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_toy_csv
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.common.serde import (
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

import client_app
from federa_app.config import parse_run_config
from federa_app.data import loading
from federa_app.errors import ConfigError
from federa_app.federation import client, warm_worker
from federa_app.federation.wire import INIT_FACTORS_KEY, NODE_REPORT_KEY
from federa_app.method.models import build_model, initial_factors, trainable_state
from federa_ops import deploy
from federa_ops.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("negative", "positive")
TIMINGS = {"train_seconds", "client_seconds"}  # differ between any two runs
HEAVY = ("torch", "transformers", "peft", "datasets", "flwr_datasets")
START_TIMEOUT = 240.0  # s: the worker imports torch, transformers and peft (slow on a busy box)


class WorkerProcess:
    """A worker process we started; its output lines collected as they come."""

    def __init__(self, command: list[str], socket_path: Path) -> None:
        self.socket = socket_path
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                if not any(text in line for line in self.lines):
                    raise AssertionError(f"worker exited: {self.lines[-5:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in {timeout} s: {self.lines[-5:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    """`federa worker` on a socket in a directory it creates (private)."""
    socket_path = tmp_path_factory.mktemp("worker") / "private" / "node-1.sock"
    command = [sys.executable, "-m", "federa_ops.cli", "worker", "--socket", str(socket_path)]
    process = WorkerProcess([*command, "--threads", "1"], socket_path)
    process.wait_for("federa worker: ready")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def node_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_csv(tmp_path_factory.mktemp("node") / "node.csv", rows=64)


def run_config(tiny_bert: Path, **extra) -> dict:
    """FeDeRA on the tiny BERT: two local steps of eight rows, one thread."""
    return {
        "model": str(tiny_bert), "method": "federa", "lora-rank": 2, "lora-alpha": 4,
        "local-steps": 2, "batch-size": 8, "num-threads": 1, "seed": 7, **extra,
    }  # fmt: skip


def server_message(config: dict, *, factors: bool = True, train_config=None) -> Message:
    """The server's train message for `config` (FeDeRA's factors in it when `factors`)."""
    cfg = parse_run_config(config)
    init = initial_factors(cfg, cfg.model, LABELS)
    model = build_model(cfg, cfg.model, LABELS, init)
    if train_config is None:
        train_config = ConfigRecord({loading.LABELS_KEY: list(LABELS), "server-round": 1})
    content = {"arrays": ArrayRecord(trainable_state(model)), "config": train_config}
    if factors:
        content[INIT_FACTORS_KEY] = ArrayRecord(init)
    msg = Message(RecordDict(content), dst_node_id=11, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperNode delivers it
    return msg


def node_context(config: dict, node_config: dict, state: RecordDict | None = None) -> Context:
    return Context(1, 11, dict(node_config), state if state is not None else RecordDict(), config)


def assert_same_reply(got: Message, expected: Message, sent: Message | None = None) -> None:
    """Equal tensors, metrics (timings aside) and node report; a reply to `sent` if given."""
    if sent is not None:
        assert got.metadata.reply_to_message_id == sent.metadata.message_id != ""
    assert got.metadata.message_type == expected.metadata.message_type
    assert set(got.content.keys()) == set(expected.content.keys())
    tensors = got.content["arrays"].to_torch_state_dict()
    reference = expected.content["arrays"].to_torch_state_dict()
    assert list(tensors) == list(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(tensors[name], tensor, rtol=0, atol=0)
    metrics, ref_metrics = dict(got.content["metrics"]), dict(expected.content["metrics"])
    assert set(metrics) == set(ref_metrics)
    assert {k: v for k, v in metrics.items() if k not in TIMINGS} == {
        k: v for k, v in ref_metrics.items() if k not in TIMINGS
    }
    if NODE_REPORT_KEY in expected.content:
        report, ref_report = (
            dict(got.content[NODE_REPORT_KEY]),
            dict(expected.content[NODE_REPORT_KEY]),
        )
        report.pop("process-seconds", None)
        ref_report.pop("process-seconds", None)
        assert report == ref_report


def assert_same_state(got: RecordDict, expected: RecordDict) -> None:
    assert set(got.keys()) == set(expected.keys())
    for key in expected.array_records:
        a, b = got[key].to_torch_state_dict(), expected[key].to_torch_state_dict()
        assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in b)


def test_worker_socket_is_private(worker):
    info = os.stat(worker.socket)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(worker.socket.parent).st_mode) == 0o700
    assert worker.lines[0].startswith(f"federa worker: ready on {worker.socket} ")


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from flwr.common.serde import context_from_proto, message_from_proto, message_to_proto
    from flwr.common.serde import recorddict_to_proto
    from flwr.proto.message_pb2 import Context, Message
    import client_app
    from federa_app.federation import warm_worker
    msg = message_from_proto(Message.FromString(open({msg!r}, "rb").read()))
    context = context_from_proto(Context.FromString(open({ctx!r}, "rb").read()))
    reply = client_app.app(msg, context)
    open({reply!r}, "wb").write(message_to_proto(reply).SerializeToString())
    open({state!r}, "wb").write(recorddict_to_proto(context.state).SerializeToString())
    heavy = [m for m in {heavy!r} if m in sys.modules]
    print(json.dumps({{"heavy": heavy, "exchange": warm_worker.last_exchange}}))
    """
)


def test_a_fresh_clientapp_process_forwards_without_importing_torch(
    worker, tiny_bert, node_csv, server_identity, tmp_path
):
    """A ClientApp process as the SuperNode starts it: the worker's reply and state equal the
    in-process handler's, and torch, transformers, peft and datasets are never imported."""
    config = run_config(tiny_bert)
    node_config = {"data": f"csv:{node_csv}", "warm-worker": str(worker.socket)}
    msg = server_message(config)
    files = {name: tmp_path / name for name in ("msg", "ctx", "reply", "state")}
    files["msg"].write_bytes(message_to_proto(msg).SerializeToString())
    context = node_context(config, node_config)
    files["ctx"].write_bytes(context_to_proto(context).SerializeToString())
    script = CHILD.format(root=str(ROOT), heavy=HEAVY, **{k: str(v) for k, v in files.items()})
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert "worker handler" in out["exchange"]  # the worker handled it, no fallback
    reply = message_from_proto(ProtoMessage.FromString(files["reply"].read_bytes()))
    state = recorddict_from_proto(ProtoRecordDict.FromString(files["state"].read_bytes()))

    expected_context = node_context(config, node_config)
    expected = client.handle_train(msg, expected_context)
    assert_same_reply(reply, expected, msg)
    assert INIT_FACTORS_KEY in state  # FeDeRA's factors, kept on first contact, came back
    assert_same_state(state, expected_context.state)


def test_state_serves_the_next_message_and_client_dp_clips_on_both_paths(
    worker, tiny_bert, node_csv, server_identity
):
    """Round 2 (factors only in the node state) with dp=client-fixed: the warm reply equals the
    in-process one, clipped by the mod in the ClientApp process."""
    config = run_config(tiny_bert, dp="client-fixed")
    node_config = {"data": f"csv:{node_csv}", "warm-worker": str(worker.socket)}

    def train_config(server_round: int) -> ConfigRecord:
        labels = {loading.LABELS_KEY: list(LABELS), KEY_CLIPPING_NORM: 1e-3}
        return ConfigRecord({**labels, "server-round": server_round})

    context = node_context(config, node_config)
    first = client_app.app(server_message(config, train_config=train_config(1)), context)
    assert not first.has_error() and "worker handler" in warm_worker.last_exchange
    assert INIT_FACTORS_KEY in context.state  # the mod moved them there, the worker kept them
    second = server_message(config, factors=False, train_config=train_config(2))
    warm = client_app.app(second, context)
    assert "worker handler" in warm_worker.last_exchange

    in_process = node_context(config, {"data": f"csv:{node_csv}"}, context.state.copy())
    again = server_message(config, factors=False, train_config=train_config(2))
    expected = client_app.app(again, in_process)
    assert_same_reply(warm, expected, second)
    assert_same_state(context.state, in_process.state)
    update = {
        name: tensor - second.content["arrays"].to_torch_state_dict()[name]
        for name, tensor in warm.content["arrays"].to_torch_state_dict().items()
    }
    norm = sum(float(d.double().square().sum()) for d in update.values()) ** 0.5
    assert norm <= 1e-3 * (1 + 1e-5)  # clipped


def test_a_training_error_is_raised_as_such_not_retried(
    worker, tiny_bert, node_csv, tmp_path, server_identity, monkeypatch
):
    """The handler's ConfigError (a model directory without config.json, found only when the
    node loads it) and RuntimeError (no factors in the message or the node state) come back as
    raised in-process; the ClientApp does not handle the message again."""
    msg = server_message(run_config(tiny_bert))
    (tmp_path / "not-a-model").mkdir()
    bad_model = run_config(tiny_bert, model=str(tmp_path / "not-a-model"))
    node_config = {"data": f"csv:{node_csv}", "warm-worker": str(worker.socket)}
    with pytest.raises(ConfigError) as in_process:
        client.handle_train(msg, node_context(bad_model, {"data": f"csv:{node_csv}"}))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the message was handled again in the ClientApp process")

    monkeypatch.setattr(client, "handle_train", must_not_run)
    with pytest.raises(ConfigError) as warm:
        client_app.app(msg, node_context(bad_model, node_config))
    assert type(warm.value) is ConfigError and str(warm.value) == str(in_process.value)
    assert any("raised in the warm worker" in note for note in warm.value.__notes__)

    no_factors = server_message(run_config(tiny_bert), factors=False)
    with pytest.raises(RuntimeError, match="holds no initial factors"):
        client_app.app(no_factors, node_context(run_config(tiny_bert), node_config))


def test_fallbacks_warn_once_and_give_the_in_process_reply(
    worker, tiny_bert, node_csv, server_identity, tmp_path, monkeypatch, caplog
):
    config = run_config(tiny_bert)
    msg = server_message(config)
    expected = client.handle_train(msg, node_context(config, {"data": f"csv:{node_csv}"}))
    node_config = {"data": f"csv:{node_csv}", "warm-worker": str(worker.socket)}
    assert_same_reply(client_app.app(msg, node_context(config, node_config)), expected)
    assert "worker handler" in warm_worker.last_exchange  # so the worker serves this node
    cases = {
        "no socket there": str(tmp_path / "absent" / "node.sock"),
        "the socket path must be absolute": "node.sock",
        "serves another node": str(worker.socket),  # the worker is pinned to its first node
        "differs from the worker's": str(worker.socket),
    }
    for reason, socket_path in cases.items():
        node_config = {"data": f"csv:{node_csv}", "warm-worker": socket_path}
        if reason == "serves another node":
            node_config["site"] = "another"  # any other node config: refused
        if reason == "differs from the worker's":  # a run whose app bundle has other code
            monkeypatch.setitem(warm_worker._cached, "digest", "0" * 64)
        context = node_context(config, node_config)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flwr"):
            reply = client_app.app(msg, context)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and reason in warnings[0], warnings
        assert "handling the message in this process" in warnings[0]
        assert_same_reply(reply, expected, msg)
        assert INIT_FACTORS_KEY in context.state


FAULTY_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from federa_app.federation.warm_worker import run_worker

    def handler(msg, context):  # stands in for a worker that dies while training
        print("handling", flush=True)
        while not os.path.exists(sys.argv[2]):  # the test's go-ahead
            time.sleep(0.05)
        os._exit(9)

    run_worker(sys.argv[1], 1, handler=handler)
    """
)


def test_a_busy_or_dying_worker_leaves_the_message_to_the_clientapp(
    tiny_bert, node_csv, server_identity, tmp_path, caplog
):
    """Two messages: the second finds the worker busy, the first loses it mid-message (it
    exits); both are handled in this process, with the in-process reply."""
    socket_path, go = tmp_path / "private" / "node.sock", tmp_path / "die-now"
    command = [sys.executable, "-c", FAULTY_WORKER, str(socket_path), str(go)]
    faulty = WorkerProcess(command, socket_path)
    try:
        faulty.wait_for("federa worker: ready")
        config = run_config(tiny_bert)
        node_config = {"data": f"csv:{node_csv}", "warm-worker": str(socket_path)}
        expected = client.handle_train(
            server_message(config), node_context(config, {"data": f"csv:{node_csv}"})
        )
        sent = {"first": server_message(config), "second": server_message(config)}
        replies = {}

        def handle(name: str) -> None:
            replies[name] = client_app.app(sent[name], node_context(config, node_config))

        with caplog.at_level(logging.WARNING, logger="flwr"):
            first = threading.Thread(target=handle, args=("first",))
            first.start()
            faulty.wait_for("handling", timeout=60)
            handle("second")
            go.touch()  # only now: two in-process handlers at once would share torch's seed
            first.join(120)
        warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert len(warnings) == 2
        assert "busy with another message" in warnings[1]
        assert "connection lost mid-message" in warnings[0]
        assert set(replies) == {"first", "second"}
        for name, reply in replies.items():
            assert_same_reply(reply, expected, sent[name])
    finally:
        faulty.stop()


def test_operator_commands_and_node_config():
    """`federa worker` and `federa deploy local --warm-workers` parse; the node config that
    deploy gives each SuperNode names the worker's socket."""
    args = build_parser().parse_args(["worker", "--socket", "/run/n.sock", "--threads", "2"])
    assert (args.socket, args.threads, args.func.__name__) == ("/run/n.sock", 2, "_worker")
    assert build_parser().parse_args(["deploy", "local", "--warm-workers"]).warm_workers
    given = deploy.node_config(1, 2, "csv:/d.csv", Path("/h/workers/node-1.sock"))
    config = parse_config_args([given])  # as flower-supernode --node-config reads it
    assert config == {
        "partition-id": 0, "num-partitions": 2, "data": "csv:/d.csv",
        warm_worker.WORKER_KEY: "/h/workers/node-1.sock",
    }  # fmt: skip
    assert "warm-worker" not in deploy.node_config(1, 2, None)


def test_worker_refuses_a_socket_directory_open_to_others(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "federa_ops.cli", "worker", "--socket", str(shared / "n.sock")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "must belong to this user and be closed to others" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (shared / "n.sock").exists()


def test_sigterm_stops_the_worker_and_removes_its_socket(worker):
    """Last in this file: it stops the module's worker."""
    assert worker.socket.exists()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(30) == 0
    worker.wait_for("federa worker: stopped", timeout=5)
    assert not worker.socket.exists()
