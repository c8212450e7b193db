"""Modelled edge time and time-to-target (issue 4): measured compute, modelled links.

We cannot run Jetsons here, so a round's edge time is modelled from what was measured: each
sampled client's ClientApp seconds times `device-slowdown`, plus its bytes over the uplink and
downlink rates; the round waits for the slowest client, then for the server's aggregation.
Server-side evaluation is a measurement of ours, not part of training, so it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TARGET_FIELDS = (
    "rounds_to_target",
    "bytes_up_to_target",
    "bytes_down_to_target",
    "wall_seconds_to_target",
    "edge_seconds_to_target",
)


@dataclass(frozen=True)
class EdgeLink:
    """How much slower an edge device computes than this machine, and its link rates."""

    device_slowdown: float = 1.0
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0

    def client_seconds(self, compute_seconds: float, bytes_up: int, bytes_down: int) -> float:
        """One client's modelled round: slowed-down compute, then its upload and download."""
        return (
            compute_seconds * self.device_slowdown
            + bytes_up * 8 / (self.uplink_mbps * 1e6)
            + bytes_down * 8 / (self.downlink_mbps * 1e6)
        )


def edge_round_seconds(row: dict[str, Any], link: EdgeLink) -> float:
    """A metrics.jsonl row's modelled edge seconds: slowest client plus server aggregation."""
    costs: Sequence[Sequence[float]] = row.get("client_costs") or []
    slowest = max((link.client_seconds(*cost) for cost in costs), default=0.0)
    return slowest + row.get("aggregation_seconds", 0.0)


def time_to_target(
    rows: list[dict[str, Any]], target: float, link: EdgeLink
) -> dict[str, Any] | None:
    """Rounds, bytes, measured wall time and modelled edge time until accuracy >= target.

    Rows are a run's metrics.jsonl (round 0 = before training). Round 0 reaching the target
    counts as 0 rounds. None when the target is never reached (or no target, `target` <= 0).
    """
    if target <= 0:
        return None
    bytes_up = bytes_down = 0
    wall = edge = 0.0
    for row in rows:
        if row["round"] > 0:
            bytes_up += row["bytes_up"]
            bytes_down += row["bytes_down"]
            wall += row["round_seconds"]
            edge += edge_round_seconds(row, link)
        if row["accuracy"] >= target:
            values = (row["round"], bytes_up, bytes_down, wall, edge)
            return dict(zip(TARGET_FIELDS, values, strict=True))
    return None
