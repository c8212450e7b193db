"""`make docker-check` / `make arm64-check` refuse a bad environment with one line and exit 2,
before building anything, and leave nothing behind (no engine, no mounts, no processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy import docker_check  # noqa: E402
from deploy.host import CheckError  # noqa: E402

CHECKS = ("deploy/docker_check.py", "deploy/arm64_check.py")


def preflight(script: str, prefix: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, str(ROOT / script), "--preflight"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("script", CHECKS)
def test_without_root_one_line_and_exit_2(script: str) -> None:
    assert os.geteuid() == 0, "this test drops root to check the refusal; run the suite as root"
    done = preflight(script, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    line = one_error_line(done)
    assert "needs root" in line and "sudo" in line


@pytest.mark.parametrize("script", CHECKS)
def test_without_the_package_registries_one_line_and_exit_2(script: str) -> None:
    # A new network namespace has no route anywhere: the Debian mirror and PyPI are unreachable.
    done = preflight(script, ["unshare", "--net"])
    line = one_error_line(done)
    assert "does not answer" in line and "mirror" in line


def test_an_engine_that_cannot_start_is_one_error_and_is_not_left_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")  # no engine answers
    monkeypatch.setenv("FEDERA_DOCKERD", "false")  # an engine binary that exits at once
    monkeypatch.setattr(docker_check, "CACHE", tmp_path)
    monkeypatch.setattr(docker_check, "ENGINE_ROOT", tmp_path / "engine")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(CheckError) as error:
        with docker_check.docker_engine():
            pytest.fail("the engine cannot have started")
    assert "did not start" in str(error.value) and "\n" not in str(error.value)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
