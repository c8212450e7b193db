"""Time-to-target arithmetic on a hand-made metrics file, and the weight-update analysis."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from federa_app.config import parse_run_config
from federa_app.method.federa_init import lora_layers
from federa_app.method.models import build_model, initial_factors
from federa_app.records.edge import EdgeLink, edge_round_seconds, time_to_target
from federa_app.records.run_dir import read_metrics
from federa_app.records.updates import UpdateTracker, effective_weights

# Three rounds after round 0. client_costs: [ClientApp seconds, bytes up, bytes down].
ROWS = [
    {"round": 0, "accuracy": 0.50, "bytes_up": 0, "bytes_down": 0, "round_seconds": 9.0,
     "client_costs": [], "aggregation_seconds": 0.0},
    {"round": 1, "accuracy": 0.60, "bytes_up": 2_000_000, "bytes_down": 4_000_000,
     "round_seconds": 30.0, "aggregation_seconds": 0.5,
     "client_costs": [[10.0, 1_000_000, 2_000_000], [4.0, 1_000_000, 2_000_000]]},
    {"round": 2, "accuracy": 0.72, "bytes_up": 2_000_000, "bytes_down": 2_000_000,
     "round_seconds": 20.0, "aggregation_seconds": 0.25,
     "client_costs": [[3.0, 1_000_000, 1_000_000], [5.0, 1_000_000, 1_000_000]]},
    {"round": 3, "accuracy": 0.70, "bytes_up": 2_000_000, "bytes_down": 2_000_000,
     "round_seconds": 20.0, "aggregation_seconds": 0.25,
     "client_costs": [[3.0, 1_000_000, 1_000_000]]},
]  # fmt: skip
LINK = EdgeLink(device_slowdown=2.0, uplink_mbps=8.0, downlink_mbps=16.0)


def test_edge_round_is_the_slowest_client_plus_aggregation() -> None:
    # round 1, client 1: 10 s x 2 + 8 Mbit / 8 Mbit/s + 16 Mbit / 16 Mbit/s = 22 s; client 2: 10 s
    assert edge_round_seconds(ROWS[1], LINK) == pytest.approx(22.0 + 0.5)
    # round 2: client 2 is the slowest, 5 x 2 + 1 + 0.5 = 11.5
    assert edge_round_seconds(ROWS[2], LINK) == pytest.approx(11.5 + 0.25)
    assert edge_round_seconds(ROWS[0], LINK) == 0.0


def test_time_to_target_from_a_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rows = read_metrics(tmp_path)
    reached = time_to_target(rows, 0.70, LINK)
    assert reached == {
        "rounds_to_target": 2,
        "bytes_up_to_target": 4_000_000,
        "bytes_down_to_target": 6_000_000,
        "wall_seconds_to_target": 50.0,  # round 0 (initial evaluation) is not training time
        "edge_seconds_to_target": pytest.approx(22.5 + 11.75),
    }
    assert time_to_target(rows, 0.60, LINK)["rounds_to_target"] == 1
    assert time_to_target(rows, 0.50, LINK)["rounds_to_target"] == 0  # reached before training
    assert time_to_target(rows, 0.73, LINK) is None  # never reached
    assert time_to_target(rows, 0.0, LINK) is None  # no target set
    # The link model matters: a 10x faster device and links make the same rounds cheaper.
    fast = EdgeLink(device_slowdown=0.2, uplink_mbps=80.0, downlink_mbps=160.0)
    assert time_to_target(rows, 0.70, fast)["edge_seconds_to_target"] == pytest.approx(
        2.2 + 0.5 + 1.15 + 0.25
    )


def test_edge_settings_are_validated() -> None:
    from federa_app.errors import ConfigError

    for key in ("device-slowdown", "uplink-mbps", "downlink-mbps"):
        with pytest.raises(ConfigError, match=f"{key}=0.0 is invalid: must be > 0"):
            parse_run_config({key: 0.0})
    with pytest.raises(ConfigError, match=r"target-accuracy=1.5 is invalid: in \[0, 1\]"):
        parse_run_config({"target-accuracy": 1.5})


def test_update_tracker_norms_and_cosines() -> None:
    tracker = UpdateTracker()
    assert tracker.observe(torch.zeros(3)) == {"update_norm": None, "update_cosine": None}
    first = tracker.observe(torch.tensor([3.0, 4.0, 0.0]))
    assert first == {"update_norm": 5.0, "update_cosine": None}
    back = tracker.observe(torch.tensor([0.0, 0.0, 0.0]))  # the exact opposite step
    assert back["update_norm"] == pytest.approx(5.0)
    assert back["update_cosine"] == pytest.approx(-1.0)
    side = tracker.observe(torch.tensor([0.0, 0.0, 2.0]))  # orthogonal to the last step
    assert side["update_cosine"] == pytest.approx(0.0)


def test_effective_weights_are_what_the_adapter_adds(tiny_bert: Path) -> None:
    """For a LoRA method, s * B @ A per layer (plus the head), independent of the factor split."""
    cfg = parse_run_config({"model": str(tiny_bert), "lora-rank": 4, "lora-alpha": 8})
    labels = ("a", "b")
    model = build_model(cfg, str(tiny_bert), labels, initial_factors(cfg, str(tiny_bert), labels))
    vector = effective_weights(model)
    layers = lora_layers(model)
    scale = 8 / 4
    expected = [
        (scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).flatten()
        for layer in layers.values()
    ]
    head = [p.flatten() for n, p in model.named_parameters() if p.requires_grad and "lora" not in n]
    assert torch.allclose(vector, torch.cat(expected + head).detach(), atol=1e-6)
    # Rescaling the factors (B*c, A/c) changes the tensors that travel but not the weights.
    before = vector.clone()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.mul_(3.0)
            layer.lora_A["default"].weight.div_(3.0)
    assert torch.allclose(effective_weights(model), before, atol=1e-5)
    assert math.isfinite(float(before.norm()))
