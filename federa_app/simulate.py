"""`federa simulate`: run the app in Flower's Ray-backed Simulation Engine, for people.

It wraps `flwr run` with what `flwr run --stream` lacks: validation before anything starts, one
progress line per round, a final table, a non-zero exit when the ServerApp failed or a round got
no results, and cleanup of everything it started. It starts its own simulation SuperLink (the
same command line as Flower's managed `:local:` one) on free ports with a private FLWR_HOME, so
it knows the PID to stop and leaves the user's ~/.flwr alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federa_app import data
from federa_app.config import RunConfig, parse_run_config, to_flwr_overrides
from federa_app.errors import ConfigError, FederaError
from federa_app.models import check_model_fits, resolve_model
from federa_app.records import SUMMARY_FILE, read_metrics, runs_root
from federa_app.strategies import build_strategy

Log = Callable[[str], object]


class SimulationFailed(FederaError):
    """The run started but did not finish well (ServerApp error, or a round without results)."""


def default_app_dir() -> Path:
    """The Flower app to run: this source tree (where pyproject.toml declares the app)."""
    return Path(__file__).resolve().parent.parent


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's `[tool.flwr.app.config]` defaults, as `flwr run` will merge them."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"no Flower app at {app_dir}: pyproject.toml not found")
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def validate(cfg: RunConfig, num_clients: int) -> None:
    """Everything checkable before Ray starts: model, dataset, rank, node counts, partitions."""
    needed = max(cfg.min_train_nodes, cfg.min_available_nodes)
    if num_clients < max(needed, 1):
        raise ConfigError(
            f"--num-clients {num_clients} is below min-train-nodes/min-available-nodes "
            f"({needed}): use more clients or lower those keys"
        )
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # building it logs "federated evaluation skipped"
    try:
        build_strategy(cfg)  # fails on a strategy parameter the strategy does not have
    finally:
        flwr_logger.setLevel(level)
    model_ref = resolve_model(cfg.model)
    data.validate_dataset_name(cfg.dataset)
    train, _, labels = data.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    check_model_fits(cfg, model_ref, len(labels))
    data.partition_sizes(
        train, cfg.partitioner, num_clients, cfg.seed, cfg.dirichlet_alpha, cfg.classes_per_client
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, process: subprocess.Popen, log_file: Path) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationFailed(
                f"flower-superlink exited with code {process.returncode}; see {log_file}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SimulationFailed(f"flower-superlink did not become healthy in 60 s; see {log_file}")


def _stop(process: subprocess.Popen | None) -> None:
    """Stop a process we started and all its descendants (ServerApp, flwr-simulation, Ray).

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
    for proc in family:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    process.poll()  # reap our direct child


def _progress_line(row: dict[str, Any], rounds: int) -> str:
    return (
        f"round {row['round']:>3}/{rounds}  accuracy {row['accuracy']:.4f}  "
        f"macro-F1 {row['macro_f1']:.4f}  loss {row['loss']:.4f}  "
        f"clients {row['clients']:>3}  up {row['bytes_up'] / 1e6:8.3f} MB  "
        f"down {row['bytes_down'] / 1e6:8.3f} MB  {row['round_seconds']:6.1f} s"
    )


def result_table(run_dir: Path) -> str:
    """A plain-text table of a finished run: per round, then the summary."""
    rows = read_metrics(run_dir)
    summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    lines = [
        f"{'round':>5} {'accuracy':>9} {'macro-F1':>9} {'loss':>7} {'train loss':>10} "
        f"{'MB up':>8} {'MB down':>8} {'seconds':>8}",
    ]
    for r in rows:
        train_loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        lines.append(
            f"{r['round']:>5} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['loss']:>7.4f} "
            f"{train_loss:>10} {r['bytes_up'] / 1e6:>8.3f} {r['bytes_down'] / 1e6:>8.3f} "
            f"{r['round_seconds']:>8.1f}"
        )
    lines.append(
        f"{summary['method']} on {summary['dataset']} with {summary['strategy']}: final accuracy "
        f"{summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}, majority class "
        f"{summary['majority_rate']:.4f}); trainable {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} parameters; {summary['bytes_up_total'] / 1e6:.2f} MB up, "
        f"{summary['bytes_down_total'] / 1e6:.2f} MB down; {summary['wall_seconds']:.0f} s"
    )
    return "\n".join(lines)


def simulate(
    num_clients: int = 10,
    overrides: dict[str, Any] | None = None,
    output_dir: str | Path = "runs",
    app_dir: Path | None = None,
    cpus_per_client: int = 1,
    log: Log = print,
) -> Path:
    """Run one simulation to completion and return its run directory; raise on any failure."""
    app_dir = Path(app_dir or default_app_dir()).resolve()
    overrides = dict(overrides or {})
    overrides["output-dir"] = str(Path(overrides.get("output-dir") or output_dir).resolve())
    cfg = parse_run_config({**app_defaults(app_dir), **overrides})
    if not cfg.run_name:
        overrides["run-name"] = time.strftime("%Y%m%d-%H%M%S-") + f"{cfg.method}-{os.getpid()}"
        cfg = parse_run_config({**app_defaults(app_dir), **overrides})
    if cpus_per_client < 1:
        raise ConfigError(f"--cpus-per-client {cpus_per_client} must be an integer >= 1")
    validate(cfg, num_clients)
    run_dir = runs_root(cfg.output_dir) / cfg.run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists and is not empty")

    flwr_home = Path(tempfile.mkdtemp(prefix="federa-flwr-"))
    port, control_port = _free_port(), _free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "federa"\n\n[superlink.federa]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    bin_dir = Path(sys.executable).parent
    superlink_log = flwr_home / "superlink.log"
    run_log = flwr_home / "flwr-run.log"
    superlink = runner = None
    log(f"federa: {num_clients} clients, {cfg.method} on {cfg.dataset}, run directory {run_dir}")
    try:
        superlink = subprocess.Popen(
            [str(bin_dir / "flower-superlink"), "--insecure", "--simulation",
             "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
             "--control-api-address", f"127.0.0.1:{control_port}",
             "--disable-runtime-dependency-installation", "--log-file", str(superlink_log)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=flwr_home,  # the cwd would shadow the bundle's modules
        )  # fmt: skip
        _wait_healthy(port, superlink, superlink_log)
        federation = f"num-supernodes={num_clients} client-resources-num-cpus={cpus_per_client}"
        with open(run_log, "w") as out:
            runner = subprocess.Popen(
                [str(bin_dir / "flwr"), "run", str(app_dir), "federa", "--stream",
                 "--run-config", to_flwr_overrides(overrides),
                 "--federation-config", federation],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=flwr_home,
            )  # fmt: skip
            shown = 0
            while runner.poll() is None:
                time.sleep(1)
                rows = read_metrics(run_dir)
                for row in rows[shown:]:
                    log(_progress_line(row, cfg.num_server_rounds))
                shown = len(rows)
            for row in read_metrics(run_dir)[shown:]:
                log(_progress_line(row, cfg.num_server_rounds))
        if run_dir.exists():
            shutil.copy(run_log, run_dir / "flwr.log")
        if not (run_dir / SUMMARY_FILE).exists():
            raise SimulationFailed(_failure_reason(run_log, superlink_log))
        return run_dir
    finally:
        _stop(runner)
        _stop(superlink)
        shutil.rmtree(flwr_home, ignore_errors=True)


def _failure_reason(run_log: Path, superlink_log: Path) -> str:
    """The most telling line of a failed run's logs, for a one-line error."""
    lines = run_log.read_text(errors="replace").splitlines() if run_log.exists() else []
    ours = [line for line in lines if "got no results" in line and "Error" in line]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): \S", line)]
    if ours or errors:
        return "the run failed: " + (ours or errors)[-1].strip()[:400]
    tail = " | ".join(line.strip() for line in lines[-3:])[-400:]
    return f"the run failed (no summary.json written); last log lines: {tail or superlink_log}"
