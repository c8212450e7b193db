"""Nothing lost, nothing poisoned: reply validation, failing nodes, checkpoint and resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import SIM_CPUS_PER_CLIENT, write_toy_csv
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from federa_app.config import STRATEGIES, parse_run_config, to_flwr_overrides
from federa_app.errors import ConfigError
from federa_app.federation import checkpoint
from federa_app.federation.client import TRAIN_METRIC_KEYS
from federa_app.federation.privacy import with_dp
from federa_app.federation.strategies import build_strategy
from federa_app.federation.validation import reject_reason
from federa_app.records.run_dir import read_metrics
from federa_ops.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
SENT = {"lora_A": np.ones((2, 3), np.float32), "head.bias": np.zeros(2, np.float32)}
HONEST_METRICS = dict.fromkeys(TRAIN_METRIC_KEYS, 1.0) | {"num-examples": 10}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def _reply(arrays=None, metrics=None, extra_records=None) -> Message:
    content = RecordDict(
        {
            "arrays": _record(SENT if arrays is None else arrays),
            "metrics": MetricRecord(HONEST_METRICS if metrics is None else metrics),
            **(extra_records or {}),
        }
    )
    msg = Message(RecordDict(), dst_node_id=5, message_type="train")
    return Message(content, reply_to=msg)


def _reason(reply: Message, max_norm: float = 0.0) -> str | None:
    return reject_reason(reply, {"arrays": _record(SENT)}, TRAIN_METRIC_KEYS, max_norm)


def test_sound_replies_pass_and_each_fault_is_named(server_identity):
    nan = {**SENT, "lora_A": np.full((2, 3), np.nan, np.float32)}
    inf = {**SENT, "head.bias": np.array([0, np.inf], np.float32)}
    assert _reason(_reply()) is None
    assert _reason(_reply({**SENT, "lora_A": SENT["lora_A"] + 0.5})) is None
    assert "NaN or Inf" in _reason(_reply(nan))
    assert "NaN or Inf" in _reason(_reply(inf))
    reshaped = {**SENT, "lora_A": np.ones((3, 2), np.float32)}
    assert _reason(_reply(reshaped)) == "tensor lora_A is float32[3, 2], sent float32[2, 3]"
    assert "float64" in _reason(_reply({**SENT, "lora_A": np.ones((2, 3))}))
    smuggled = {**SENT, "bert.encoder.layer.0.attention.self.query.weight": np.eye(4)}
    assert "extra ['bert.encoder.layer.0" in _reason(_reply(smuggled))
    assert "missing ['head.bias']" in _reason(_reply({"lora_A": SENT["lora_A"]}))
    assert "array records" in _reason(_reply(extra_records={"more": _record(SENT)}))
    assert "metric keys" in _reason(_reply(metrics={"num-examples": 10}))
    assert "num-examples=0" in _reason(_reply(metrics=HONEST_METRICS | {"num-examples": 0}))
    assert "not a finite" in _reason(_reply(metrics=HONEST_METRICS | {"train_loss": np.nan}))


def test_max_update_norm_bounds_the_update_not_the_weights(server_identity):
    moved = {**SENT, "lora_A": SENT["lora_A"] + 1.0}  # ||update|| = sqrt(6) ~ 2.449
    assert _reason(_reply(moved), max_norm=2.5) is None
    assert _reason(_reply(moved), max_norm=2.4) == "update norm 2.449 exceeds max-update-norm 2.4"
    assert _reason(_reply(moved), max_norm=0.0) is None  # 0 = off


class _Grid:
    """The Grid surface a strategy's configure_train uses: node ids."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self):
        return self.nodes


def _round(strategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One round with deterministic replies: each node moves the weights by its own step."""
    replies = []
    for message in strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid(4)):
        node = message.metadata.dst_node_id
        rng = np.random.default_rng(server_round * 100 + node)
        sent = message.content["arrays"]
        moved = {
            k: a.numpy() + rng.normal(0, 0.5, a.shape).astype(np.float32) for k, a in sent.items()
        }
        metrics = MetricRecord({"num-examples": 10 * node, "train_loss": 1.0 / server_round})
        reply_content = RecordDict({"arrays": _record(moved), "metrics": metrics})
        replies.append(Message(reply_content, reply_to=message))
    aggregated, _ = strategy.aggregate_train(server_round, sorted(replies, key=_node))
    return aggregated


def _node(message: Message) -> int:
    return message.metadata.src_node_id


STATEFUL = {"fedadam", "fedyogi", "fedadagrad", "fedavgm"}


@pytest.mark.parametrize("dp", ["none", "server-adaptive"])
@pytest.mark.parametrize("name", [s for s in STRATEGIES if s != "svd-avg"])
def test_strategy_state_survives_a_checkpoint(name, dp, server_identity, tmp_path, frozen_heap):
    """Rounds 3-4 after a save/load of the round-2 state (in a fresh strategy, with the random
    generators disturbed as in a new process) equal rounds 3-4 of an uninterrupted run."""
    overrides = {"strategy": name, "dp": dp, "dp-noise-multiplier": 0.1, "dp-clipping-norm": 2.0}
    if name == "fedavgm":
        overrides["server-momentum"] = 0.9
    cfg = parse_run_config(overrides)

    def fresh():
        return with_dp(build_strategy(cfg), cfg, 4)

    start = _record({"w": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)})
    np.random.seed(0)
    uninterrupted, arrays = fresh(), start
    for server_round in (1, 2, 3, 4):
        arrays = _round(uninterrupted, server_round, arrays)
        if server_round == 2:
            after_two = arrays
    expected = arrays

    np.random.seed(0)
    first = fresh()
    arrays = _round(first, 2, _round(first, 1, start))
    for left, right in zip(arrays.values(), after_two.values(), strict=True):
        np.testing.assert_array_equal(left.numpy(), right.numpy())
    saved = checkpoint.Checkpoint(
        round=2, arrays=arrays.to_torch_state_dict(), previous_arrays=None,
        strategy_state=checkpoint.strategy_state(first), rng=checkpoint.rng_state(), rows=[],
        factors=None, config=cfg.to_dict(), wall_seconds=1.0, svd_seconds=0.0,
    )  # fmt: skip
    checkpoint.save(tmp_path, saved)
    np.random.seed(12345)  # a new process: other generator states, a fresh strategy
    loaded = checkpoint.load(tmp_path)
    resumed = fresh()
    checkpoint.restore_strategy_state(resumed, loaded.strategy_state)
    checkpoint.restore_rng(loaded.rng)
    arrays = ArrayRecord(loaded.arrays)
    for server_round in (3, 4):
        arrays = _round(resumed, server_round, arrays)
    for key in expected:
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key].numpy())

    if name in STATEFUL or dp != "none":  # the test can fail: without the state it differs
        np.random.seed(12345)
        forgetful, arrays = fresh(), ArrayRecord(loaded.arrays)
        checkpoint.restore_rng(loaded.rng)
        for server_round in (3, 4):
            arrays = _round(forgetful, server_round, arrays)
        assert any(not np.array_equal(arrays[k].numpy(), expected[k].numpy()) for k in expected)


def test_checkpoint_is_replaced_atomically_and_loads_without_pickle(tmp_path):
    cfg = parse_run_config({})
    state = checkpoint.Checkpoint(
        round=3, arrays={"w": torch.ones(2)}, previous_arrays=None, strategy_state=[{}],
        rng=checkpoint.rng_state(), rows=[{"round": 0, "failed_nodes": [[7, "x"]]}],
        factors=None, config=cfg.to_dict(), wall_seconds=2.0, svd_seconds=0.5,
    )  # fmt: skip
    checkpoint.save(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_FILE]  # no temp left
    torch.load(tmp_path / checkpoint.CHECKPOINT_FILE, weights_only=True)  # plain data only
    loaded = checkpoint.load(tmp_path)
    assert (
        loaded.round == 3
        and loaded.rows == state.rows
        and torch.equal(loaded.arrays["w"], torch.ones(2))
    )


def test_resume_refuses_a_changed_run_or_one_without_rounds_left(tmp_path):
    cfg = parse_run_config({"num-server-rounds": 4})
    saved = checkpoint.Checkpoint(
        round=2, arrays={}, previous_arrays=None, strategy_state=[{}], rng={}, rows=[],
        factors=None, config=cfg.to_dict(), wall_seconds=0.0, svd_seconds=0.0,
    )  # fmt: skip
    checkpoint.check_resumable(saved, parse_run_config({"num-server-rounds": 6, "wire-log": True}))
    with pytest.raises(ConfigError, match=r"differs .* in learning-rate=0.1 \(run: 0.005\)"):
        checkpoint.check_resumable(saved, parse_run_config({"learning-rate": 0.1}))
    with pytest.raises(ConfigError, match="already completed round 2 of num-server-rounds=2"):
        checkpoint.check_resumable(saved, parse_run_config({"num-server-rounds": 2}))
    with pytest.raises(ConfigError, match="no checkpoint.pt there"):
        checkpoint.load(tmp_path)
    # A run checkpointed before a key existed ran with that key's default (precision=fp32).
    older = dataclasses.replace(saved, config={k: v for k, v in saved.config.items()
                                               if k != "precision"})  # fmt: skip
    checkpoint.check_resumable(older, parse_run_config({"num-server-rounds": 6}))
    with pytest.raises(ConfigError, match=r"precision='bf16' \(run: 'fp32'\)"):
        checkpoint.check_resumable(older, parse_run_config({"num-server-rounds": 6,
                                                            "precision": "bf16"}))  # fmt: skip


def test_resume_of_a_directory_without_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    from federa_ops.cli import main

    assert main(["simulate", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["deploy", "local", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("no checkpoint.pt there" in line for line in err)


# --- In a real simulation -------------------------------------------------------------------

FAULTY_CLIENT = '''
"""A ClientApp whose nodes misbehave by partition id (written by tests/test_faults.py)."""
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.clientapp import ClientApp

from federa_app.federation.client import handle_train

app = ClientApp()
HONEST_DIR = {honest_dir!r}


@app.train()
def train(msg, context):
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    if pid == 6 or (pid == 1 and server_round == 2):
        raise RuntimeError(f"deliberately broken node {{pid}}")
    reply = handle_train(msg, context)
    arrays = {{k: a.numpy().copy() for k, a in reply.content["arrays"].items()}}
    if pid in (0, 1):
        torch.save({{k: torch.from_numpy(a) for k, a in arrays.items()}} | {{
            "num-examples": torch.tensor(reply.content["metrics"]["num-examples"])}},
            f"{{HONEST_DIR}}/round{{server_round}}-node{{pid}}.pt")
        return reply
    first = next(iter(arrays))
    if pid == 2:
        arrays[first][...] = np.nan
    elif pid == 3:
        arrays[first] = arrays[first][:-1]
    elif pid == 4:
        arrays[first + ".extra"] = arrays[first].copy()
    elif pid == 5:  # a full-model weight smuggled into an adapter reply
        arrays["bert.embeddings.word_embeddings.weight"] = np.ones((40, 32), np.float32)
    elif pid == 7:  # no num-examples: would make Flower's FedAvg skip the whole round
        metrics = dict(reply.content["metrics"])
        del metrics["num-examples"]
        reply.content["metrics"] = MetricRecord(metrics)
    reply.content["arrays"] = ArrayRecord({{k: Array(a) for k, a in arrays.items()}})
    return reply
'''


def _faulty_app(tmp_path: Path) -> tuple[Path, Path]:
    app, honest = tmp_path / "faulty-app", tmp_path / "honest"
    app.mkdir()
    honest.mkdir()
    for name in ("pyproject.toml", "server_app.py", "README.md"):
        shutil.copy(ROOT / name, app / name)
    shutil.copytree(ROOT / "federa_app", app / "federa_app", ignore=shutil.ignore_patterns("__py*"))
    (app / "client_app.py").write_text(FAULTY_CLIENT.format(honest_dir=str(honest)))
    return app, honest


def _honest_mean(honest: Path, server_round: int) -> dict[str, torch.Tensor]:
    """FedAvg of the two honest replies of a round, computed here from what they sent."""
    replies = [torch.load(honest / f"round{server_round}-node{pid}.pt") for pid in (0, 1)]
    weights = [float(r.pop("num-examples")) for r in replies]
    return {
        key: sum(w * r[key].double() for w, r in zip(weights, replies, strict=True)) / sum(weights)
        for key in replies[0]
    }


def _tiny(tiny_bert: Path, csv: Path, **extra) -> dict:
    return {
        "model": str(tiny_bert), "dataset": f"csv:{csv}", "partitioner": "iid",
        "local-steps": 5, "batch-size": 16, "learning-rate": 0.01, "lora-rank": 4,
        "lora-alpha": 8, **extra,
    }  # fmt: skip


def test_faulty_and_failing_nodes_cannot_poison_the_global_model(tmp_path, tiny_bert):
    """8 nodes: 0-1 honest, 2 NaN, 3 wrong shape, 4 extra tensor, 5 smuggled full-model weight,
    6 raises, 7 drops num-examples. In round 2 node 1 raises too: one sound reply is below
    min-train-nodes=2, so round 2 does not count and the model stays as round 1 left it."""
    app, honest = _faulty_app(tmp_path)
    csv = write_toy_csv(tmp_path / "toy.csv")
    overrides = _tiny(tiny_bert, csv, **{"num-server-rounds": 3, "run-name": "faulty",
                                        "min-available-nodes": 8})  # fmt: skip
    run_dir = simulate(8, overrides, tmp_path / "runs", app, SIM_CPUS_PER_CLIENT, log=print)

    rows = read_metrics(run_dir)
    assert [r["clients"] for r in rows] == [0, 2, 1, 2]
    assert [r["rejected"] for r in rows] == [0, 5, 5, 5]
    assert [r["failures"] for r in rows] == [0, 1, 2, 1]
    assert [r["counted"] for r in rows] == [True, True, False, True]
    reasons = sorted(reason for _, reason in rows[1]["rejected_nodes"])
    assert len(reasons) == 5
    expected_reasons = ("NaN or Inf", "is float32[", ".weight.extra'", "extra ['bert.embeddings",
                        "missing ['num-examples']")  # fmt: skip
    for expected in expected_reasons:
        assert sum(expected in r for r in reasons) == 1, (expected, reasons)
    assert all("deliberately broken node 6" in r for _, r in rows[1]["failed_nodes"])
    assert rows[2]["update_norm"] == 0.0  # not counted: the global model did not move

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_not_counted"] == [2]
    assert summary["failures_total"] == 4 and summary["rejected_total"] == 15
    by_round = {entry["round"]: entry for entry in summary["failures_by_round"]}
    assert sorted(by_round) == [1, 2, 3] and by_round[2]["counted"] is False
    assert sorted(r for _, r in by_round[2]["failed"]) == [
        "deliberately broken node 1", "deliberately broken node 6"
    ]  # fmt: skip

    final = checkpoint.load(run_dir)
    assert final.round == 3
    for got, want in ((final.arrays, _honest_mean(honest, 3)),
                      (final.previous_arrays, _honest_mean(honest, 1))):  # fmt: skip
        assert set(got) == set(want)
        for key in want:
            assert torch.isfinite(got[key]).all()
            torch.testing.assert_close(got[key].double(), want[key], rtol=1e-6, atol=1e-6)


COMPARED = ("accuracy", "macro_f1", "loss", "train_loss", "update_norm", "update_cosine",
            "bytes_up", "clients", "counted")  # fmt: skip


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, tiny_bert):
    """FeDeRA with FedAdam (server moments) under server-adaptive DP (clipping norm state, numpy
    noise): every process of the run is SIGKILLed once round 2's checkpoint exists; `federa
    simulate --resume` finishes rounds 3-4, whose metrics equal an uninterrupted run's."""
    csv = write_toy_csv(tmp_path / "toy.csv")
    settings = {
        "num-server-rounds": 4, "strategy": "fedadam", "dp": "server-adaptive",
        "dp-noise-multiplier": 0.05, "dp-clipping-norm": 0.5, "local-steps": 8,
    }  # fmt: skip
    killed_dir = tmp_path / "runs" / "killed"
    overrides = to_flwr_overrides(_tiny(tiny_bert, csv, **settings, **{"run-name": "killed"}))
    command = [sys.executable, "-m", "federa_ops.cli", "simulate", "--num-clients", "2",
               "--cpus-per-client", str(SIM_CPUS_PER_CLIENT),
               "--output-dir", str(tmp_path / "runs"), "--run-config", overrides]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not _checkpoint_round(killed_dir) >= 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.02)
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert any("flwr-simulation" in " ".join(p.cmdline()) for p in family)
        for process in family:  # the whole server side dies at once, as in a power cut
            process.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, output
    time.sleep(1)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (killed_dir / "summary.json").exists()
    killed_at = checkpoint.load(killed_dir).round
    assert killed_at in (2, 3)  # the kill lands while round 3 trains (rarely just after it)

    lines: list[str] = []
    resumed = simulate(2, {"resume-from": str(killed_dir)}, tmp_path / "ignored",
                       cpus_per_client=SIM_CPUS_PER_CLIENT, log=lines.append)  # fmt: skip
    assert resumed == killed_dir
    assert any(f"resuming {killed_dir}" in line for line in lines)
    assert [line.split("/")[0].split()[-1] for line in lines if line.startswith("round")] == [
        str(r) for r in range(killed_at + 1, 5)
    ]  # only the new rounds are printed
    reference = simulate(2, _tiny(tiny_bert, csv, **settings, **{"run-name": "whole"}),
                         tmp_path / "runs", cpus_per_client=SIM_CPUS_PER_CLIENT,
                         log=lambda _: None)  # fmt: skip

    got, want = read_metrics(resumed), read_metrics(reference)
    assert [r["round"] for r in got] == [0, 1, 2, 3, 4]
    factor_bytes = ArrayRecord(checkpoint.load(resumed).factors).count_bytes()
    assert got[killed_at + 1]["bytes_down"] - want[killed_at + 1]["bytes_down"] == 2 * factor_bytes
    assert [g["bytes_down"] for g in got[killed_at + 2 :]] == [
        w["bytes_down"] for w in want[killed_at + 2 :]
    ]  # the new run's nodes get FeDeRA's factors again, once
    for g, w in zip(got, want, strict=True):
        for key in COMPARED:
            expected = w[key] if w[key] is None else pytest.approx(w[key], rel=1e-5, abs=1e-7)
            assert g[key] == expected, (g["round"], key)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_after_rounds"] == [killed_at]
    assert summary["dp"] == "server-adaptive"
    assert summary["dp_final_clipping_norm"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["dp_final_clipping_norm"]
    )
    assert (resumed / "flwr.log").exists()


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return checkpoint.load(run_dir).round
    except (ConfigError, RuntimeError, EOFError, OSError):
        return -1
