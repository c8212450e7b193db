"""`make arm64-check`: an arm64 SuperNode (qemu) and an x86 one complete a FeDeRA run together.

Marker `arm64` (deselected by `make test`: needs root, ~5 GB cached, minutes). The module fixture
runs deploy/arm64_check.py once; the tests assert on its report. Emulated seconds are qemu's, not
an arm64 device's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy import arm64_check  # noqa: E402

pytestmark = pytest.mark.arm64


@pytest.fixture(scope="module")
def report() -> dict:
    # The report stays for the operator (figures, logs): $FEDERA_ARM64_REPORT or the cache.
    path = Path(os.environ.get("FEDERA_ARM64_REPORT", arm64_check.CACHE / "arm64-check.json"))
    result = arm64_check.run_check(path)
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=1))
    return result


def node_reports(report: dict) -> list[dict]:
    return [n for row in report["metrics"][1:] for n in row["nodes"]]


def test_the_run_completed_with_both_nodes_every_round(report: dict) -> None:
    rows = report["metrics"]
    rounds = arm64_check.RUN_CONFIG["num-server-rounds"]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert all(r["counted"] and r["clients"] == 2 and r["failures"] == 0 for r in rows[1:])
    assert report["summary"]["method"] == "federa"


def test_the_arm64_node_trained(report: dict) -> None:
    machines = [n["machine"] for n in node_reports(report)]
    assert machines.count("aarch64") == arm64_check.RUN_CONFIG["num-server-rounds"]
    assert machines.count("x86_64") == arm64_check.RUN_CONFIG["num-server-rounds"]


def test_arm64_residual_is_bit_identical_to_x86(report: dict) -> None:
    digests = {(n["machine"], n["residual-sha256"]) for n in node_reports(report)}
    assert {machine for machine, _ in digests} == {"aarch64", "x86_64"}
    assert len({digest for _, digest in digests}) == 1, digests  # one W_res, whatever the CPU
    assert all(len(digest) == 64 for _, digest in digests)


def test_emulation_cost_is_recorded(report: dict) -> None:
    by_machine: dict[str, list[float]] = {}
    for node in node_reports(report):
        by_machine.setdefault(node["machine"], []).append(node["process-seconds"])
    assert set(by_machine) == {"aarch64", "x86_64"}
    # qemu emulates every instruction: the arm64 node's ClientApp process takes longer.
    assert min(by_machine["aarch64"]) > max(by_machine["x86_64"])


def test_nothing_is_left_mounted(report: dict) -> None:
    assert report["mounts_after"] == []
