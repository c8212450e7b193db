"""`federa deploy local`: the same app on Flower's Deployment Engine, every part on loopback.

One SuperLink and N SuperNodes run as separate processes with their own ports, as they would on
N devices; `flwr run` submits the app to them. With TLS the SuperLink serves a certificate from a
private CA and admits only SuperNodes whose public keys were registered (node authentication).
Like `federa simulate`, it validates first, prints one line per round, writes the same run
directory, exits non-zero when the run failed and stops every process it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federa_app.config import to_flwr_overrides
from federa_app.errors import ConfigError, RunFailed
from federa_app.records.run_dir import unused_path
from federa_ops import runtime
from federa_ops.certs import DEFAULT_SANS, Credentials, make_credentials
from federa_ops.runtime import BIN_DIR, Log
from federa_ops.simulate import prepare_run

ISOLATIONS = ("subprocess", "process")
NODES_ONLINE_TIMEOUT = 120.0  # s; a SuperNode connects within a few seconds on loopback
WORKER_READY_TIMEOUT = 300.0  # s; a warm worker imports torch, transformers and peft first
WORKER_READY = "federa worker: ready"


@dataclass(frozen=True)
class NodeNetwork:
    """Where a SuperNode runs: a command prefix (e.g. `ip netns exec NS` for a network
    namespace behind a rate-limited link, or `chroot ROOTFS` for an arm64 node under qemu), the
    SuperLink's address as seen from there, and where Flower's commands are found there."""

    prefix: tuple[str, ...] = ()
    superlink_host: str = "127.0.0.1"
    bin_dir: Path = BIN_DIR


@dataclass
class Node:
    """One SuperNode we started (and, with process isolation, its SuperExec)."""

    index: int  # 1-based, as in supernode-1.key
    port: int  # its Runtime API (where its ClientApps / SuperExec connect)
    process: subprocess.Popen
    log_file: Path
    superexec: subprocess.Popen | None = None
    reported: bool = False  # its exit was announced
    # The ClientApps it started, seen while it ran: if the node dies they live on, re-parented.
    children: set = field(default_factory=set)

    def track_children(self) -> None:
        """Remember the processes this node started so far (psutil.Process objects)."""
        import psutil

        try:
            self.children.update(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass


@dataclass
class Deployment:
    """Every process of a loopback deployment, so all can be stopped whatever happened."""

    home: Path  # private FLWR_HOME: connection config, certificates, logs
    port: int
    credentials: Credentials | None
    env: dict[str, str]
    superlink: subprocess.Popen | None = None
    superlink_exec: subprocess.Popen | None = None
    nodes: list[Node] | None = None
    runner: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)  # --warm-workers, per node

    def stop(self) -> None:
        """Stop everything started, newest first (the run, nodes, then the SuperLink)."""
        runtime.stop(self.runner)
        for node in self.nodes or []:
            runtime.stop(node.superexec)
            runtime.stop(node.process)
            runtime.stop_orphans(node.children)
        for worker in self.workers:
            runtime.stop(worker)
        runtime.stop(self.superlink_exec)
        runtime.stop(self.superlink)

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against this deployment's SuperLink (connection `federa`)."""
        return subprocess.run(
            [str(BIN_DIR / "flwr"), *args], env=self.env, cwd=self.home,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip


def node_config(index: int, nodes: int, data: str | None, warm_worker: Path | None = None) -> str:
    """The `--node-config` of SuperNode `index`: its partition and, if given, its own data and
    its warm worker's socket."""
    config = f"partition-id={index - 1} num-partitions={nodes}"
    config += f' data="{data}"' if data else ""
    return config + (f' warm-worker="{warm_worker}"' if warm_worker else "")


def worker_socket(dep: Deployment, index: int) -> Path:
    """Where SuperNode `index`'s warm worker listens: in the deployment's private home (0700)."""
    return dep.home / "workers" / f"node-{index}.sock"


def start_worker(
    dep: Deployment, index: int, nodes: int, network: NodeNetwork = NodeNetwork()
) -> subprocess.Popen:
    """Start SuperNode `index`'s warm worker (`federa worker`) where the node runs, with its
    threads. The socket path must mean the same file to the worker and the node's ClientApps."""
    threads = max(1, len(os.sched_getaffinity(0)) // nodes)  # as start_node gives the node
    return runtime.start(
        [*network.prefix, str(network.bin_dir / "federa"), "worker",
         "--socket", str(worker_socket(dep, index)), "--threads", str(threads)],
        dep.home / f"worker-{index}.log", {**dep.env, "OMP_NUM_THREADS": str(threads)}, dep.home,
    )  # fmt: skip


def wait_for_workers(dep: Deployment, log: Log) -> None:
    """Wait until every warm worker printed its ready line; fail fast when one exits."""
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    pending = dict(enumerate(dep.workers, 1))
    while pending and time.monotonic() < deadline:
        for index, worker in list(pending.items()):
            log_file = dep.home / f"worker-{index}.log"
            text = log_file.read_text(errors="replace") if log_file.exists() else ""
            if WORKER_READY in text:
                del pending[index]
            elif worker.poll() is not None:
                last = (text.strip().splitlines() or ["(empty log)"])[-1][:300]
                raise RunFailed(f"warm worker {index} exited with code {worker.returncode}: {last}")
        time.sleep(0.5)
    if pending:
        raise RunFailed(
            f"warm workers {sorted(pending)} were not ready in {WORKER_READY_TIMEOUT:.0f} s; "
            f"see the logs in {dep.home}"
        )
    log(f"federa: {len(dep.workers)} warm workers ready")


def start_superlink(dep: Deployment, isolation: str, host: str = "127.0.0.1") -> None:
    """Start the SuperLink (TLS and node authentication when credentials are given)."""
    creds = dep.credentials
    security = (
        ["--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
         "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth"]
        if creds else ["--insecure"]
    )  # fmt: skip
    log_file = dep.home / "superlink.log"
    dep.superlink = runtime.start(
        [str(BIN_DIR / "flower-superlink"), *security, "--isolation", isolation,
         "--host", host, "--port", str(dep.port),
         "--disable-runtime-dependency-installation"],
        log_file, dep.env, dep.home,
    )  # fmt: skip
    runtime.wait_healthy(dep.port, dep.superlink, log_file, creds.ca_cert if creds else None)
    if isolation == "process":  # the ServerApp then runs in a SuperExec of its own
        dep.superlink_exec = start_superexec(dep, f"127.0.0.1:{dep.port}", "superlink", True)


def start_superexec(
    dep: Deployment,
    address: str,
    name: str,
    via_superlink: bool,
    prefix: tuple[str, ...] = (),
    bin_dir: Path = BIN_DIR,
) -> subprocess.Popen:
    """A SuperExec that runs the apps a SuperLink or SuperNode hands it (process isolation)."""
    tls = (
        ["--root-certificates", str(dep.credentials.ca_cert)]
        if via_superlink and dep.credentials else ["--insecure"]
    )  # fmt: skip
    return runtime.start(
        [*prefix, str(bin_dir / "flower-superexec"), "--runtime-api-address", address, *tls],
        dep.home / f"superexec-{name}.log", dep.env, dep.home,
    )  # fmt: skip


def register_node(dep: Deployment, index: int) -> None:
    """Register SuperNode `index`'s public key, so the SuperLink admits it."""
    result = dep.flwr("supernode", "register", str(dep.credentials.node_public_key(index)))
    if result.returncode != 0:
        reason = (result.stdout + result.stderr).strip().splitlines()[-1:]
        raise RunFailed(f"registering supernode-{index}'s key failed: {' '.join(reason)}")


def start_node(
    dep: Deployment,
    index: int,
    nodes: int,
    isolation: str,
    data: str | None,
    key: Path | None,
    network: NodeNetwork = NodeNetwork(),
    warm_worker: Path | None = None,
) -> Node:
    """Start SuperNode `index` (1-based) on its own port; its ClientApps forward their train
    messages to the warm worker at `warm_worker` (a socket) when given."""
    creds = dep.credentials
    security = ["--root-certificates", str(creds.ca_cert)] if creds else ["--insecure"]
    if key is not None:
        security += ["--auth-supernode-private-key", str(key)]
    port = runtime.free_port()
    log_file = dep.home / f"supernode-{index}.log"
    # N nodes share this machine's cores, as Ray's clients do in simulation (set_threads reads it).
    env = {**dep.env, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nodes))}
    process = runtime.start(
        [*network.prefix, str(network.bin_dir / "flower-supernode"), *security,
         "--superlink", f"{network.superlink_host}:{dep.port}",
         "--port", str(port), "--isolation", isolation,
         "--node-config", node_config(index, nodes, data, warm_worker)],
        log_file, env, dep.home,
    )  # fmt: skip
    node = Node(index, port, process, log_file)
    if isolation == "process":
        node.superexec = start_superexec(
            dep, f"127.0.0.1:{port}", f"supernode-{index}", False, network.prefix, network.bin_dir
        )
    return node


def online_nodes(dep: Deployment) -> int:
    """How many SuperNodes the SuperLink sees online (`flwr supernode list`)."""
    result = dep.flwr("supernode", "list", "--format", "json")
    try:
        listed = json.loads(result.stdout).get("nodes", [])
    except json.JSONDecodeError:
        return 0
    return sum(1 for node in listed if str(node.get("status", "")).lower() == "online")


def exit_reason(node: Node) -> str:
    """Why a SuperNode exited: the signal that killed it, or its exit code and last error line."""
    code = node.process.returncode
    if code < 0:
        return f"supernode-{node.index} was killed by signal {-code}"
    lines = node.log_file.read_text(errors="replace").splitlines()
    errors = [line.strip() for line in lines if "ERROR" in line]
    detail = (errors or lines or ["(empty log)"])[-1][:300]
    return f"supernode-{node.index} exited with code {code}: {detail}"


def wait_for_nodes(dep: Deployment, log: Log) -> None:
    """Wait until every SuperNode is online; fail fast (with its reason) when one exits."""
    deadline = time.monotonic() + NODES_ONLINE_TIMEOUT
    while time.monotonic() < deadline:
        for node in dep.nodes:
            if node.process.poll() is not None:
                raise RunFailed(exit_reason(node))
        online = online_nodes(dep)
        if online >= len(dep.nodes):
            log(f"federa: {online} SuperNodes online")
            return
        time.sleep(1)
    raise RunFailed(
        f"only {online_nodes(dep)} of {len(dep.nodes)} SuperNodes came online in "
        f"{NODES_ONLINE_TIMEOUT:.0f} s; see the logs in {dep.home}"
    )


def deploy_local(
    nodes: int = 3,
    overrides: dict[str, Any] | None = None,
    output_dir: str | Path = "runs",
    app_dir: Path | None = None,
    tls: bool = False,
    isolation: str = "subprocess",
    node_data: Sequence[str] = (),
    log: Log = print,
    networks: Sequence[NodeNetwork] = (),
    warm_workers: bool = False,
) -> Path:
    """Run one job on a loopback SuperLink + `nodes` SuperNodes; return its run directory.

    `networks` (one per node) runs the SuperNodes elsewhere, e.g. in network namespaces
    (benchmarks/bench_deploy.py --netns); the SuperLink then listens on all interfaces.
    `warm_workers` starts a warm worker (`federa worker`) next to each SuperNode and sets the
    node's `warm-worker` node config to its socket (federa_app/federation/warm_worker.py).
    """
    if isolation not in ISOLATIONS:
        raise ConfigError(f"--isolation '{isolation}' is not one of: {', '.join(ISOLATIONS)}")
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes} must be >= 1")
    if networks and len(networks) != nodes:
        raise ConfigError(f"{len(networks)} node networks given for --nodes {nodes}")
    if node_data and len(node_data) != nodes:
        raise ConfigError(
            f"--node-data was given {len(node_data)} times for --nodes {nodes}: give it once "
            "per SuperNode, or not at all (then each node gets a partition of `dataset`)"
        )
    app_dir, overrides, cfg, run_dir = prepare_run(overrides, output_dir, app_dir, nodes)

    home = Path(tempfile.mkdtemp(prefix="federa-deploy-"))
    sans = (*DEFAULT_SANS, *sorted({n.superlink_host for n in networks} - set(DEFAULT_SANS)))
    credentials = make_credentials(home / "certs", nodes, sans) if tls else None
    dep = Deployment(home, runtime.free_port(), credentials, runtime.flower_env(home))
    address = f"127.0.0.1:{dep.port}"
    runtime.write_connection(home, address, credentials.ca_cert if credentials else None)
    security = "TLS + node authentication" if tls else "insecure (plain text)"
    log(f"federa: SuperLink on {address}, {nodes} SuperNodes, {security}, {isolation} isolation")
    log(f"federa: {cfg.method} on {cfg.dataset}, run directory {run_dir}")
    run_log = home / "flwr-run.log"
    try:
        remote = any(n.superlink_host != "127.0.0.1" for n in networks)
        if warm_workers:  # first: their imports overlap the SuperLink's and the nodes' start
            dep.workers = [
                start_worker(dep, i, nodes, networks[i - 1] if networks else NodeNetwork())
                for i in range(1, nodes + 1)
            ]
        start_superlink(dep, isolation, "0.0.0.0" if remote else "127.0.0.1")
        dep.nodes = []
        for index in range(1, nodes + 1):
            if credentials:
                register_node(dep, index)
            key = credentials.node_keys[index - 1] if credentials else None
            data = node_data[index - 1] if node_data else None
            network = networks[index - 1] if networks else NodeNetwork()
            sock = worker_socket(dep, index) if warm_workers else None
            dep.nodes.append(start_node(dep, index, nodes, isolation, data, key, network, sock))
        if warm_workers:
            wait_for_workers(dep, log)
        wait_for_nodes(dep, log)

        def watch() -> None:  # a SuperNode that dies mid-run is announced once; the run goes on
            for node in dep.nodes:
                if node.process.poll() is None:
                    node.track_children()
                elif not node.reported:
                    node.reported = True
                    log(f"federa: {exit_reason(node)}")

        bundle = runtime.stage_app(app_dir, home / "app")  # flwr run builds the FAB from it
        dep.runner = runtime.start(
            [str(BIN_DIR / "flwr"), "run", str(bundle), "federa", "--stream",
             "--run-config", to_flwr_overrides(overrides)],
            run_log, dep.env, home,
        )  # fmt: skip
        runtime.follow(dep.runner, run_dir, cfg.num_server_rounds, log, watch)
        if run_dir.exists():
            keep_logs(home, unused_path(run_dir / "logs"))
        if not runtime.finished(run_dir):
            raise RunFailed(runtime.failure_reason(run_log, home / "superlink.log"))
        return run_dir
    finally:
        dep.stop()
        shutil.rmtree(home, ignore_errors=True)


def keep_logs(home: Path, logs_dir: Path) -> None:
    """Copy every process's log into the run directory (the deployment's home is deleted)."""
    logs_dir.mkdir(exist_ok=True)
    for log_file in home.glob("*.log"):
        shutil.copy(log_file, logs_dir / log_file.name)
