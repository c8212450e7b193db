"""`federa simulate`: run the app in Flower's Ray-backed Simulation Engine, for people.

It wraps `flwr run` with what `flwr run --stream` lacks: validation before anything starts, one
progress line per round, a final table, a non-zero exit when the ServerApp failed or a round got
no results, and cleanup of everything it started. It starts its own simulation SuperLink (the
same command line as Flower's managed `:local:` one) on free ports with a private FLWR_HOME, so
it knows the PID to stop and leaves the user's ~/.flwr alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from federa_app.config import (
    DEFAULTS,
    RunConfig,
    app_defaults,
    default_app_dir,
    parse_run_config,
    to_flwr_overrides,
)
from federa_app.errors import ConfigError, RunFailed
from federa_app.federation import checkpoint
from federa_app.federation.server import check_before_start
from federa_app.records.run_dir import (
    CONFIG_FILE,
    read_metrics,
    retire_summary,
    runs_root,
    unused_path,
)
from federa_ops import runtime
from federa_ops.runtime import BIN_DIR, Log

FINISHED_GRACE = 1.0  # s to exit on SIGTERM once the run is finished, then SIGKILL


def result_table(run_dir: Path) -> str:
    """A plain-text table of a finished run: per round, then the summary."""
    rows = read_metrics(run_dir)
    summary = runtime.summary(Path(run_dir))
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


def resume_overrides(
    run_dir: Path, saved: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The overrides that continue `run_dir`: its checkpointed config `saved`, then the caller's."""
    return {
        **{key: value for key, value in saved.items() if key in DEFAULTS},
        **overrides,
        "resume-from": str(run_dir),
        "output-dir": str(run_dir.parent),
        "run-name": run_dir.name,
    }


def resume_nodes(run_dir: str | Path) -> int:
    """How many nodes the run to be resumed had (its config.json's num-nodes, else 2)."""
    checkpoint.require(Path(run_dir))
    config_file = Path(run_dir) / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return int(config.get("num-nodes") or 2)


def prepare_run(
    overrides: dict[str, Any] | None, output_dir: str | Path, app_dir: Path | None, nodes: int
) -> tuple[Path, dict[str, Any], RunConfig, Path]:
    """Resolve and check a run before anything starts: the app, the overrides (absolute
    output-dir, a run name), the config, and a run directory that is new or empty (or, with
    `resume-from`, a run directory whose checkpoint this config may continue)."""
    app_dir = Path(app_dir or default_app_dir()).resolve()
    overrides = dict(overrides or {})
    if overrides.get("resume-from"):
        run_dir = Path(overrides["resume-from"]).resolve()
        saved = checkpoint.load(run_dir)
        overrides = resume_overrides(run_dir, saved.config, overrides)
        cfg = parse_run_config({**app_defaults(app_dir), **overrides})
        checkpoint.check_resumable(saved, cfg)
        check_before_start(cfg, nodes)
        retire_summary(run_dir)  # checked: nothing can fail before the run now
        return app_dir, overrides, cfg, run_dir
    overrides["output-dir"] = str(Path(overrides.get("output-dir") or output_dir).resolve())
    cfg = parse_run_config({**app_defaults(app_dir), **overrides})
    if not cfg.run_name:
        overrides["run-name"] = time.strftime("%Y%m%d-%H%M%S-") + f"{cfg.method}-{os.getpid()}"
        cfg = parse_run_config({**app_defaults(app_dir), **overrides})
    check_before_start(cfg, nodes)
    run_dir = runs_root(cfg.output_dir) / cfg.run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists and is not empty")
    return app_dir, overrides, cfg, run_dir


def check_cpus_per_client(cpus_per_client: int) -> None:
    """Refuse a client CPU count Ray cannot place, before anything starts."""
    if cpus_per_client < 1:
        raise ConfigError(f"--cpus-per-client {cpus_per_client} must be an integer >= 1")


def simulate(
    num_clients: int = 10,
    overrides: dict[str, Any] | None = None,
    output_dir: str | Path = "runs",
    app_dir: Path | None = None,
    cpus_per_client: int = 1,
    log: Log = print,
) -> Path:
    """Run one simulation to completion and return its run directory; raise on any failure."""
    check_cpus_per_client(cpus_per_client)
    app_dir, overrides, cfg, run_dir = prepare_run(overrides, output_dir, app_dir, num_clients)

    flwr_home = Path(tempfile.mkdtemp(prefix="federa-flwr-"))
    port, control_port = runtime.free_port(), runtime.free_port()
    runtime.write_connection(flwr_home, f"127.0.0.1:{port}", None)
    env = runtime.flower_env(flwr_home)
    superlink_log = flwr_home / "superlink.log"
    run_log = flwr_home / "flwr-run.log"
    superlink = runner = None
    resuming = f", resuming {run_dir}" if cfg.resume_from else f", run directory {run_dir}"
    log(f"federa: {num_clients} clients, {cfg.method} on {cfg.dataset}{resuming}")
    try:
        superlink = runtime.start(
            [str(BIN_DIR / "flower-superlink"), "--insecure", "--simulation",
             "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
             "--control-api-address", f"127.0.0.1:{control_port}",
             "--disable-runtime-dependency-installation"],
            superlink_log, env, flwr_home,
        )  # fmt: skip
        runtime.wait_healthy(port, superlink, superlink_log)
        federation = f"num-supernodes={num_clients} client-resources-num-cpus={cpus_per_client}"
        bundle = runtime.stage_app(app_dir, flwr_home / "app")  # flwr run builds the FAB from it
        runner = runtime.start(
            [str(BIN_DIR / "flwr"), "run", str(bundle), "federa", "--stream",
             "--run-config", to_flwr_overrides(overrides), "--federation-config", federation],
            run_log, env, flwr_home,
        )  # fmt: skip
        runtime.follow(runner, run_dir, cfg.num_server_rounds, log)
        if run_dir.exists():
            shutil.copy(run_log, unused_path(run_dir / "flwr.log"))
        if not runtime.finished(run_dir):
            raise RunFailed(runtime.failure_reason(run_log, superlink_log))
        return run_dir
    finally:
        # After summary.json only Flower's teardown is left: Ray's processes take 5-8 s to
        # leave on SIGTERM, and nothing of the run is lost by not waiting for them.
        grace = FINISHED_GRACE if runtime.finished(run_dir) else 15.0
        runtime.stop(runner, grace)
        runtime.stop(superlink, grace)
        shutil.rmtree(flwr_home, ignore_errors=True)
