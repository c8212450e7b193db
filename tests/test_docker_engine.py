"""`make docker-check`: the image built and compose.yaml's TLS federation run on a Docker engine.

Marker `docker` (deselected by `make test`: needs root, several GB and minutes). The module
fixture runs deploy/docker_check.py once (build, federation up, a 2-round run, everything torn
down) and the tests assert on what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy import docker_check  # noqa: E402

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def report() -> dict:
    # The report stays for the operator (figures, logs): $FEDERA_DOCKER_REPORT or the cache.
    path = Path(os.environ.get("FEDERA_DOCKER_REPORT", docker_check.CACHE / "docker-check.json"))
    result = docker_check.run_check(path)
    print(json.dumps({k: v for k, v in result.items() if k not in ("metrics", "compose_logs_tail")},
                     indent=1))  # fmt: skip
    for row in result.get("metrics", []):
        print(f"round {row['round']}: {row['round_seconds']:.1f} s, slowest ClientApp "
              f"{row['client_seconds_max']:.1f} s, accuracy {row['accuracy']:.3f}")  # fmt: skip
    return result


def test_every_round_has_its_metrics_row(report: dict) -> None:
    rows = report["metrics"]
    assert [r["round"] for r in rows] == list(range(docker_check.ROUNDS + 1)), report.get(
        "compose_logs_tail"
    )
    assert all(r["counted"] for r in rows[1:])
    assert all(r["clients"] == 2 and r["failures"] == 0 and r["rejected"] == 0 for r in rows[1:])
    assert report["summary"]["rounds"] == docker_check.ROUNDS
    assert {"config.json", "metrics.jsonl", "summary.json", "adapter"} <= set(
        report["run_dir_files"]
    )


def test_clientapps_ran_as_uid_49999_in_the_image(report: dict) -> None:
    nodes = [n for r in report["metrics"][1:] for n in r["nodes"]]
    assert len(nodes) == 2 * docker_check.ROUNDS
    assert {n["uid"] for n in nodes} == {docker_check.UID}
    assert {n["python"][:4] for n in nodes} == {"3.11"}
    assert len({n["node"] for n in nodes}) == 2
    assert report["image"]["user"] == "app"
    assert report["image"]["architecture"] == "amd64"


def test_no_private_key_or_model_weight_in_the_image(report: dict) -> None:
    scan = report["image_scan"]
    assert scan == {"private_keys": [], "weights": [], "check_credentials": []}


def test_tls_was_on(report: dict) -> None:
    tls = report["tls"]
    assert tls["tls_version"] in ("TLSv1.2", "TLSv1.3")  # verified against the check's own CA
    assert not tls["plain_http_answer"].startswith("HTTP/")  # plain text gets no HTTP answer


def test_nothing_is_left_running(report: dict) -> None:
    assert report["leftovers"] == {"containers": [], "networks": [], "volumes": []}
    if report["engine_started_here"]:
        assert not report["engine_running_after"]
    assert report["workdir_removed"]
