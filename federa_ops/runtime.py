"""Starting, watching and stopping Flower's processes: what `federa simulate` and `federa deploy`
share. Both wrap `flwr run --stream`, which exits 0 even when the ServerApp failed and leaves
what it started running, so the wrappers own every process and judge success by summary.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.cli.build import get_filtered_fab_paths
from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
from flwr.common.constant import FAB_CONFIG_FILE, FAB_EXCLUDE_PATTERNS

from federa_app.errors import RunFailed
from federa_app.records.run_dir import SUMMARY_FILE, read_metrics

Log = Callable[[str], object]
BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for every Flower process: a private FLWR_HOME, no telemetry, no uv sync."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    """`$FLWR_HOME/config.toml` with one SuperLink connection, `federa`, the default."""
    tls = (
        f'root-certificates = "{root_certificates}"\n' if root_certificates else "insecure = true\n"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "federa"\n\n[superlink.federa]\naddress = "{address}"\n{tls}'
    )


def bundle_files(app_dir: Path) -> dict[str, Path]:
    """The files Flower puts in `app_dir`'s bundle (FAB), by their paths in it, found without
    entering the directories Flower would drop anyway (gitignored, __pycache__, .git)."""
    gitignore = app_dir / ".gitignore"
    ignored = build_pathspec(
        [*load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""),
         *FAB_EXCLUDE_PATTERNS, ".git/"]
    )  # fmt: skip
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(app_dir):
        here = Path(folder).relative_to(app_dir)
        subfolders[:] = [d for d in subfolders if not ignored.match_file(f"{here / d}/")]
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():  # Flower skips symlinks too
                files[(here / name).as_posix()] = path
    config = tomllib.loads((app_dir / FAB_CONFIG_FILE).read_text())
    kept = get_filtered_fab_paths(filter_paths_for_publish(files), config)
    return {name: files[name] for name in [FAB_CONFIG_FILE, *kept]}


def stage_app(app_dir: Path, into: Path) -> Path:
    """Copy `app_dir`'s bundle into `into` (created) and return it, for `flwr run` to build from.

    `flwr run` walks and resolves every file under the app directory before it filters them:
    ~50,000 in a checkout with its .venv, 5-7 s of CPU a run. The copy builds the same FAB."""
    for name, path in bundle_files(app_dir).items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, into / name)
    return into


def start(command: list[str], log_file: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start a Flower process in its own session, its output in `log_file`.

    The cwd must not be the app's source tree: the process would import the app's modules from
    there instead of from the bundle it was sent.
    """
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=cwd,
        )  # fmt: skip


def wait_healthy(
    port: int, process: subprocess.Popen, log_file: Path, ca_cert: Path | None = None
) -> None:
    """Wait until a SuperLink answers on /health (https verified against `ca_cert` with TLS)."""
    import httpx

    scheme = "https" if ca_cert else "http"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RunFailed(
                f"flower-superlink exited with code {process.returncode}; see {log_file}"
            )
        try:
            url = f"{scheme}://127.0.0.1:{port}/health"
            if httpx.get(url, timeout=1, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RunFailed(f"flower-superlink did not become healthy in 60 s; see {log_file}")


def stop(process: subprocess.Popen | None, grace: float = 15.0) -> None:
    """Stop a process we started and all its descendants (ServerApp, ClientApps, Ray).

    Killing the process group is not enough: flower-superexec starts its own session, so
    flwr-simulation and Ray's processes would outlive an interrupted run. They are collected
    before anything is signalled, as they get re-parented once their parent dies.
    """
    import psutil

    if process is None or process.poll() is not None:
        return
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.NoSuchProcess:
        return
    _terminate_then_kill(family, grace)
    process.poll()  # reap our direct child


def stop_orphans(processes: set) -> None:
    """Stop processes (psutil.Process) that outlived the parent we started them through."""
    _terminate_then_kill([p for p in processes if p.is_running()])  # also rules out reused PIDs


def _terminate_then_kill(processes: list, grace: float = 15.0) -> None:
    """SIGTERM each process, give them `grace` seconds to exit, then SIGKILL the rest."""
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def progress_line(row: dict[str, Any], rounds: int) -> str:
    """One line per finished round, as `federa simulate` and `federa deploy` print it."""
    failed = f"  failed {row['failures']}" if row.get("failures") else ""
    failed += f"  rejected {row['rejected']}" if row.get("rejected") else ""
    failed += "  (not counted: model unchanged)" if row.get("counted") is False else ""
    return (
        f"round {row['round']:>3}/{rounds}  accuracy {row['accuracy']:.4f}  "
        f"macro-F1 {row['macro_f1']:.4f}  loss {row['loss']:.4f}  "
        f"clients {row['clients']:>3}{failed}  up {row['bytes_up'] / 1e6:8.3f} MB  "
        f"down {row['bytes_down'] / 1e6:8.3f} MB  {row['round_seconds']:6.1f} s"
    )


def follow(
    runner: subprocess.Popen,
    run_dir: Path,
    rounds: int,
    log: Log,
    watch: Callable[[], None] = lambda: None,
) -> None:
    """Print each round as the ServerApp writes it, until it wrote summary.json or `flwr run`
    exited; `watch` runs every half second (deploy checks its SuperNodes there). Rows already
    there (a resumed run's) are not shown again."""
    shown = len(read_metrics(run_dir))
    # summary.json is the ServerApp's last write: the caller can stop everything then, rather
    # than wait ~5 s for Flower to tear Ray down and mark the run finished.
    while runner.poll() is None and not finished(run_dir):
        time.sleep(0.5)
        watch()
        rows = read_metrics(run_dir)
        for row in rows[shown:]:
            log(progress_line(row, rounds))
        shown = len(rows)
    for row in read_metrics(run_dir)[shown:]:
        log(progress_line(row, rounds))


def failure_reason(run_log: Path, other_log: Path) -> str:
    """The most telling line of a failed run's logs, for a one-line error."""
    lines = run_log.read_text(errors="replace").splitlines() if run_log.exists() else []
    ours = [line for line in lines if "got no results" in line and "Error" in line]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): \S", line)]
    if ours or errors:
        return "the run failed: " + (ours or errors)[-1].strip()[:400]
    tail = " | ".join(line.strip() for line in lines[-3:])[-400:]
    return f"the run failed (no summary.json written); last log lines: {tail or other_log}"


def finished(run_dir: Path) -> bool:
    """A run is finished when the ServerApp wrote summary.json (last, atomically)."""
    return (run_dir / SUMMARY_FILE).exists()


def summary(run_dir: Path) -> dict[str, Any]:
    """The finished run's summary.json."""
    return json.loads((run_dir / SUMMARY_FILE).read_text())
