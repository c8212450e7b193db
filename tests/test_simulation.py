"""Real Ray simulations on a tiny BERT: wire contents, byte counts, run directory, failures."""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import SIM_CPUS_PER_CLIENT, check_run_directory, write_toy_csv
from flwr.app import ArrayRecord

from federa_app.config import parse_run_config, to_flwr_overrides
from federa_app.errors import RunFailed
from federa_app.federation.wire import INIT_FACTORS_KEY
from federa_app.method.federa_init import residual_digest
from federa_app.method.models import build_model, initial_factors, load_saved_model, trainable_state
from federa_app.records.run_dir import read_metrics
from federa_ops.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("negative", "positive")


def _overrides(tiny_bert: Path, csv: Path, **extra) -> dict:
    return {
        "model": str(tiny_bert),
        "dataset": f"csv:{csv}",
        "num-server-rounds": 2,
        "partitioner": "iid",
        "local-steps": 15,
        "batch-size": 16,
        "learning-rate": 0.01,
        "lora-rank": 4,
        "lora-alpha": 8,
        "wire-log": True,
        **extra,
    }


def _npy_bytes(tensor: torch.Tensor) -> int:
    """Size of a tensor serialised as Flower serialises it (.npy), computed independently."""
    buffer = io.BytesIO()
    np.save(buffer, tensor.numpy(), allow_pickle=False)
    return buffer.tell()


def _no_children_left() -> bool:
    return not [p for p in psutil.Process().children(recursive=True) if p.is_running()]


@pytest.mark.parametrize("method", ["federa", "fft"])
def test_only_trainable_tensors_cross_the_wire_and_bytes_add_up(tmp_path, tiny_bert, method):
    csv = write_toy_csv(tmp_path / "toy.csv")
    overrides = _overrides(tiny_bert, csv, method=method)
    run_dir = simulate(
        3, overrides, tmp_path / "runs", cpus_per_client=SIM_CPUS_PER_CLIENT, log=lambda _: None
    )
    assert _no_children_left()

    # The trainable tensors, computed independently of the run.
    cfg = parse_run_config(overrides)
    factors = initial_factors(cfg, str(tiny_bert), LABELS) if method == "federa" else None
    model = build_model(cfg, str(tiny_bert), LABELS, factors)
    trainable = trainable_state(model)
    expected_bytes = ArrayRecord(trainable).count_bytes()
    assert expected_bytes == sum(len(name) + _npy_bytes(t) for name, t in trainable.items())

    messages = [json.loads(line) for line in (run_dir / "wire.jsonl").read_text().splitlines()]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["loss"] < rows[0]["loss"]  # training reached the global model
    for row in rows[1:]:
        sent = [m for m in messages if m["round"] == row["round"] and m["direction"] == "down"]
        received = [m for m in messages if m["round"] == row["round"] and m["direction"] == "up"]
        assert len(sent) == len(received) == row["clients"] == 3
        for message in sent + received:
            arrays = message["arrays"]["arrays"]
            assert set(arrays) == set(trainable)
            for name, (shape, _, nbytes) in arrays.items():
                assert shape == list(trainable[name].shape)
                assert nbytes >= trainable[name].numel() * 4
        for message in received:
            assert set(message["arrays"]) == {"arrays"}
        init_sent = [m for m in sent if INIT_FACTORS_KEY in m["arrays"]]
        if method == "federa" and row["round"] == 1:
            assert len(init_sent) == 3  # once per node, in its first message
            factor_record = ArrayRecord(factors)
            for m in init_sent:
                assert set(m["arrays"][INIT_FACTORS_KEY]) == set(factors)
                assert m["bytes"] >= expected_bytes + factor_record.count_bytes()
        else:
            assert init_sent == []  # never again, and never for other methods
        assert row["bytes_down"] == sum(m["bytes"] for m in sent)
        assert row["bytes_up"] == sum(m["bytes"] for m in received)
        for m in received:  # arrays + a MetricRecord of 6 scalars (8 bytes each + key names)
            assert 6 * 8 < m["bytes"] - expected_bytes < 6 * 8 + 120
        # Each node reported what it is and the digest of the frozen residual it trained on
        # (stripped from the reply before aggregation and byte counting, recorded per node).
        nodes = row["nodes"]
        assert len({n["node"] for n in nodes}) == 3
        assert {(n["machine"], n["uid"]) for n in nodes} == {(platform.machine(), os.getuid())}
        digests = {n["residual-sha256"] for n in nodes}
        assert digests == ({residual_digest(model)} if method == "federa" else {""})

    _, summary = check_run_directory(run_dir, 2)
    assert summary["trainable_params"] == sum(t.numel() for t in trainable.values())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and config["num-nodes"] == 3

    # The saved model reloads with plain transformers (+ peft) to the reported accuracy.
    from federa_app.data import loading

    dataset, labels = loading.load_labelled(f"csv:{csv}")
    _, test = loading.split_train_test(dataset, cfg.test_fraction, cfg.seed)
    loaded = load_saved_model(run_dir / "adapter", str(tiny_bert), tuple(labels))
    from federa_app.method.models import load_tokenizer
    from federa_app.method.training import evaluate

    loader = loading.make_loader(test, load_tokenizer(str(tiny_bert)), 64, 64, False, 0)
    scores = evaluate(loaded, loader, len(labels))
    assert scores["accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1e-9)
    assert scores["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4)


def test_a_round_without_results_fails_the_run_and_leaves_nothing_running(tmp_path, tiny_bert):
    app = tmp_path / "faulty-app"
    app.mkdir()
    for name in ("pyproject.toml", "server_app.py", "README.md"):
        shutil.copy(ROOT / name, app / name)
    shutil.copytree(ROOT / "federa_app", app / "federa_app", ignore=shutil.ignore_patterns("__py*"))
    (app / "client_app.py").write_text(
        "from flwr.clientapp import ClientApp\n\napp = ClientApp()\n\n\n"
        "@app.train()\ndef train(msg, context):\n"
        "    raise RuntimeError('deliberately broken client')\n"
    )
    csv = write_toy_csv(tmp_path / "toy.csv")
    with pytest.raises(RunFailed, match="round 1 got no results"):
        simulate(
            2, _overrides(tiny_bert, csv, **{"run-name": "broken"}), tmp_path / "runs",
            app_dir=app, cpus_per_client=SIM_CPUS_PER_CLIENT, log=lambda _: None,
        )  # fmt: skip
    run_dir = tmp_path / "runs" / "broken"
    assert not (run_dir / "summary.json").exists()  # an unfinished run never looks complete
    assert [r["clients"] for r in read_metrics(run_dir)] == [0, 0]
    assert _no_children_left()


def test_kill_stops_every_process_the_run_started(tmp_path, tiny_bert):
    """`kill PID` on `federa simulate` (as on a stopped grid): nothing it started survives.

    flower-superexec starts its own session, so killing process groups alone left
    flwr-simulation and Ray behind; every descendant must go.
    """
    import signal
    import subprocess
    import sys
    import time

    csv = write_toy_csv(tmp_path / "toy.csv")
    overrides = _overrides(tiny_bert, csv, **{"num-server-rounds": 50, "wire-log": False})
    command = [sys.executable, "-m", "federa_ops.cli", "simulate", "--num-clients", "2",
               "--output-dir", str(tmp_path / "runs"),
               "--run-config", to_flwr_overrides(overrides)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait until the ServerApp evaluated: Ray is up
            if line.startswith("round   0/"):
                break
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("flwr-simulation" in " ".join(p.cmdline()) for p in family)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    time.sleep(1)
    survivors = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
