"""`make docker-check`: build the image and run compose.yaml's federation on a real Docker engine.

1. A Docker engine: the running one, or `dockerd --iptables=false` started here (and stopped at
   the end; its images stay in its data root as the build cache).
2. A local stand-in for Flower's base image (no image registry is reachable here): a Debian
   bookworm root file system with python3.11 (debootstrap), `docker import`, then
   deploy/flower-base.Dockerfile installs flwr==1.42.0 the way Flower's images have it.
3. `docker build --build-arg BASE_IMAGE=<stand-in>` of our Dockerfile, unchanged.
4. compose.yaml's TLS + node-auth federation (SuperLink, 2 SuperNodes with their own CSV data,
   3 SuperExecs in our image), run with host networking (all traffic on 127.0.0.1) and a
   bind-mounted asset cache, so the run directory can be read here (`host_network_compose`).
5. `flwr run . <connection>` for 2 rounds, then everything it made is removed again.

The facts it gathers go to a JSON report that tests/test_docker_engine.py (marker `docker`)
asserts on. `python deploy/docker_check.py --preflight` only checks root, registries, engine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.host import (  # noqa: E402
    CACHE,
    PYTHON_PACKAGES,
    REPO,
    CheckError,
    debootstrap,
    ensure_debian_packages,
    fail,
    require_registries,
    require_root,
    run,
    say,
    write_node_csvs,
)

PROJECT = "federa-check"  # compose project name: every container, network, volume carries it
ROOTFS_IMAGE = "federa-local/debian-python:bookworm-py3.11"
FLOWER_IMAGE = (
    "federa-local/flower:1.42.0-py3.11"  # stands in for flwr/superlink|supernode|superexec
)
FEDERA_IMAGE = "federa-superexec:check"
ENGINE_ROOT = CACHE / "docker-engine"
UID = 49999  # Flower's images run as `app`
PORT = 9091  # compose.yaml's SuperLink port, on 127.0.0.1 under host networking
NODE_PORTS = (9094, 9095)
WHEEL_PORT = 39517  # the loopback server that hands the local CPU torch wheel to the build
RUN_NAME = "docker-check"
ROUNDS = 2
NODE_ROWS = 200
# Small enough for a couple of minutes on 2 cores, large enough to learn something.
RUN_CONFIG = {
    "num-server-rounds": ROUNDS,
    "local-steps": 5,
    "eval-max-examples": 200,
    "min-train-nodes": 2,
    "min-available-nodes": 2,
    "seed": 42,
}
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".onnx",
    ".gguf",
    ".h5",
    ".msgpack",
)


def docker(*args: str, timeout: float = 1800, check: bool = True) -> str:
    """The docker CLI against the engine in use."""
    return run(["docker", *args], timeout=timeout, check=check)


def engine_answers() -> bool:
    """Whether a Docker engine answers the docker CLI (False without the CLI too)."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def docker_engine() -> Iterator[bool]:
    """The running engine, or one started here (yields True) and stopped on the way out."""
    if engine_answers():
        yield False
        return
    ENGINE_ROOT.mkdir(parents=True, exist_ok=True)
    log = open(CACHE / "dockerd.log", "ab")  # noqa: SIM115 - closed below
    # --iptables=false: the host firewall stays as it is (containers use host networking).
    dockerd = os.environ.get("FEDERA_DOCKERD", "dockerd")  # another engine binary, if wanted
    if shutil.which(dockerd) is None:
        raise CheckError(
            f"no Docker engine runs and {dockerd!r} is not installed: apt-get install docker.io"
        )
    engine = subprocess.Popen(
        [dockerd, "--iptables=false", "--data-root", str(ENGINE_ROOT),
         "--pidfile", str(CACHE / "dockerd.pid")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not engine_answers():
            if engine.poll() is not None or time.monotonic() > deadline:
                raise CheckError(
                    f"the Docker engine did not start (dockerd exit {engine.poll()}); see "
                    f"{CACHE / 'dockerd.log'}"
                )
            time.sleep(1)
        say(f"started dockerd (pid {engine.pid}, data root {ENGINE_ROOT})")
        yield True
    finally:
        engine.terminate()
        try:
            engine.wait(60)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait(10)
        log.close()


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def build_flower_image() -> None:
    """The stand-in for Flower's images: a Debian rootfs imported, then flwr installed on it."""
    if not image_exists(ROOTFS_IMAGE):
        rootfs = CACHE / "rootfs-amd64"
        if not rootfs.is_dir():
            debootstrap(rootfs, "amd64", PYTHON_PACKAGES)
        trust_host_certificates(rootfs)
        say(f"docker import {rootfs} as {ROOTFS_IMAGE}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "-", ROOTFS_IMAGE], stdin=tar.stdout)
        tar.wait()
    say(f"building {FLOWER_IMAGE} (flwr==1.42.0 on Debian's python3.11)")
    dockerfile = REPO / "deploy" / "flower-base.Dockerfile"
    docker("build", "--force-rm", "--network", "host", "-f", str(dockerfile),
           "--build-arg", f"BASE_IMAGE={ROOTFS_IMAGE}", "-t", FLOWER_IMAGE,
           str(REPO / "deploy"))  # fmt: skip


def trust_host_certificates(rootfs: Path) -> None:
    """The builds inside the image reach PyPI the way this machine does: with its CA bundle (a
    TLS-inspecting proxy's CA, where there is one) for the system and for pip."""
    bundle = Path(os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile or "")
    if not bundle.is_file():
        return
    target = rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, target)
    (rootfs / "etc" / "pip.conf").write_text(
        "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
    )


def local_torch_wheel() -> Path | None:
    """The CPU torch wheel pip resolves here, if it is a local CPU build (this machine's pip has
    one); the Dockerfile's default is PyTorch's CPU index, unreachable from these machines."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob("torch-2.13.0+cpu-*.whl"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
             "torch==2.13.0"], check=False)  # fmt: skip
        found = list(wheels.glob("torch-2.13.0+cpu-*.whl"))
    return found[0] if found else None


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # the build's own output says what it got
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP server for `directory` on 127.0.0.1 (the build reaches it over host networking)."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    # A fixed port where possible: the URL is a build argument, and a new one would miss the
    # build cache of every layer from the torch install on.
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def build_federa_image(no_cache: bool = False) -> float:
    """`docker build` of our Dockerfile on the stand-in base; returns the seconds it took."""
    args = ["--build-arg", f"BASE_IMAGE={FLOWER_IMAGE}"]
    wheel = local_torch_wheel()
    with contextlib.ExitStack() as stack:
        if wheel is not None:
            url = stack.enter_context(serve_directory(wheel.parent))
            args += ["--build-arg", "TORCH_INDEX_URL=",
                     "--build-arg", f"TORCH_SPEC=torch @ {url}/{wheel.name}"]  # fmt: skip
        say(f"building {FEDERA_IMAGE} from Dockerfile{' (no cache)' * no_cache}")
        start = time.perf_counter()
        docker("build", "--force-rm", "--network", "host", *args, *(["--no-cache"] * no_cache),
               "-t", FEDERA_IMAGE, str(REPO))  # fmt: skip
        return time.perf_counter() - start


def scan_image(image: str, forbidden_hashes: set[str]) -> dict:
    """Private keys and model weights inside the image: their paths (both lists must be empty)."""
    script = r"""
import hashlib, json, os, sys
keys, weights, same = [], [], []
forbidden = set(json.loads(sys.argv[1]))
weight_suffixes = tuple(json.loads(sys.argv[2]))
skip = ("/proc", "/sys", "/dev")
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
    for name in files:
        path = os.path.join(root, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        # Over 1 MB: a model's weights; smaller files with these names are a library's own
        # (path configs *.pth, torch's test scripts *.pt).
        if name.endswith(weight_suffixes) and size > 1_000_000:
            weights.append(path)
        if size < 100_000 and name.endswith((".key", ".pem", ".pub", ".crt", ".p12")):
            data = open(path, "rb").read()
            if b"PRIVATE KEY" in data:
                keys.append(path)
            if hashlib.sha256(data).hexdigest() in forbidden:
                same.append(path)
print(json.dumps({"private_keys": keys, "weights": weights, "check_credentials": same}))
"""
    args = [json.dumps(sorted(forbidden_hashes)), json.dumps(WEIGHT_SUFFIXES)]
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c",
                 script, *args)  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def image_facts(image: str) -> dict:
    """Size, user, entrypoint of an image."""
    info = json.loads(docker("image", "inspect", image))[0]
    return {
        "size_bytes": info["Size"],
        "user": info["Config"]["User"],
        "entrypoint": info["Config"]["Entrypoint"],
        "architecture": info["Architecture"],
    }


def prepare_workdir(workdir: Path) -> set[str]:
    """Certificates, node data, and an asset cache for the containers; the certs' sha256s."""
    import hashlib

    from federa_app.data import assets
    from federa_ops.certs import make_credentials

    creds = make_credentials(workdir / "certs", 2, ("superlink", "localhost", "127.0.0.1"))
    write_node_csvs([workdir / "data" / f"node-{i}" / "train.csv" for i in (1, 2)], NODE_ROWS, 7)
    cache = workdir / "cache"
    for name in ("minilm-l6", "rotten-tomatoes"):
        source = assets.asset_path(name)  # a model's directory, a dataset's file
        folder = source if source.is_dir() else source.parent
        shutil.copytree(folder, cache / folder.relative_to(assets.federa_home()))
    (cache / "runs").mkdir()
    for path in [cache, *cache.rglob("*"), *creds.directory.iterdir(), creds.directory]:
        os.chown(path, UID, UID)  # the containers' user reads keys (0600) and writes runs/
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in creds.directory.iterdir()}


def host_network_compose(workdir: Path) -> Path:
    """compose.yaml as the check runs it: host networking (every connection stays on 127.0.0.1,
    service names resolve there through extra_hosts; published ports go, host mode has none) and
    the asset cache bind-mounted from the check's directory, so the run directory can be read.
    What users run, compose.yaml itself, keeps its own network and named volume."""
    spec = yaml.safe_load((REPO / "compose.yaml").read_text())  # anchors and merges resolved
    names = sorted(spec["services"])
    for service in spec["services"].values():
        service.pop("ports", None)
        service["network_mode"] = "host"
        service["extra_hosts"] = [f"{name}:127.0.0.1" for name in names]
        service.pop("build", None)  # built beforehand, as FEDERA_IMAGE
        volumes = service.get("volumes", [])
        service["volumes"] = [
            f"{workdir / 'cache'}:/app/.cache/federa" if v.endswith(":/app/.cache/federa") else v
            for v in volumes
        ]
        if not service["volumes"]:
            del service["volumes"]
    spec.pop("volumes", None)
    path = workdir / "compose.check.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def compose(workdir: Path, *args: str, timeout: float = 600) -> str:
    """docker-compose on the check's variant of compose.yaml, project `federa-check`."""
    env = {
        **os.environ,
        "FLWR_SUPERLINK_IMAGE": FLOWER_IMAGE,
        "FLWR_SUPERNODE_IMAGE": FLOWER_IMAGE,
        "FEDERA_IMAGE": FEDERA_IMAGE,
    }
    path = workdir / "compose.check.yaml"
    if not path.exists():
        host_network_compose(workdir)
    command = [
        "docker-compose",
        "-p",
        PROJECT,
        "--project-directory",
        str(workdir),
        "-f",
        str(path),
    ]
    return run([*command, "-f", str(path), *args], timeout=timeout, env=env)


def superlink_healthy(ca_cert: Path) -> bool:
    """The SuperLink answers /health over TLS, verified against the check's CA."""
    import httpx

    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
        return httpx.get(f"https://127.0.0.1:{PORT}/health", verify=context, timeout=2).is_success
    except httpx.HTTPError:
        return False


def flwr(home: Path, *args: str, timeout: float = 120, check: bool = True) -> str:
    from federa_ops import runtime

    env = runtime.flower_env(home)
    return run([str(runtime.BIN_DIR / "flwr"), *args], timeout=timeout, check=check, env=env,
               cwd=home)  # fmt: skip


def tls_facts(ca_cert: Path) -> dict:
    """What 127.0.0.1:9091 serves: a TLS handshake verified against the check's CA; and whether
    a plain-text connection gets an HTTP answer (it must not)."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            version, peer = tls.version(), tls.getpeercert()
    plain_answer = b""
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(5)
        with contextlib.suppress(OSError):
            plain_answer = raw.recv(64)
    subject = dict(item[0] for item in peer["subject"])
    return {"tls_version": version, "subject": subject, "plain_http_answer": plain_answer.decode(
        "latin-1")}  # fmt: skip


def wait_for(predicate, what: str, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(2)
    raise CheckError(f"{what} did not happen within {timeout:.0f} s")


def leftovers() -> dict:
    """Containers, networks and volumes of the check's compose project still on the engine."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": docker("ps", "-a", "-q", "--filter", label).split(),
        "networks": docker("network", "ls", "-q", "--filter", label).split(),
        "volumes": docker("volume", "ls", "-q", "--filter", label).split(),
    }


def run_federation(workdir: Path, report: dict) -> None:
    """Bring up the federation, register the nodes, run the app for 2 rounds, read the results."""
    from federa_app.config import to_flwr_overrides
    from federa_ops import runtime

    home = workdir / "flwr-home"
    home.mkdir()
    runtime.write_connection(home, f"127.0.0.1:{PORT}", workdir / "certs" / "ca.crt")
    say("compose: SuperLink and the ServerApp's SuperExec")
    compose(workdir, "up", "-d", "--no-build", "superlink", "superexec-serverapp")
    ca_cert = workdir / "certs" / "ca.crt"
    wait_for(lambda: superlink_healthy(ca_cert), "the SuperLink answering on /health (TLS)", 120)
    for i in (1, 2):
        flwr(home, "supernode", "register", str(workdir / "certs" / f"supernode-{i}.pub"))
    say("compose: both SuperNodes and their SuperExecs")
    compose(workdir, "up", "-d", "--no-build")
    report["tls"] = tls_facts(workdir / "certs" / "ca.crt")

    def online() -> bool:
        listed = json.loads(flwr(home, "supernode", "list", "--format", "json") or "{}")
        return (
            sum(str(n.get("status", "")).lower() == "online" for n in listed.get("nodes", [])) == 2
        )

    wait_for(online, "both SuperNodes online", 180)
    config = {**RUN_CONFIG, "output-dir": "/app/.cache/federa/runs", "run-name": RUN_NAME}
    say(f"flwr run: {ROUNDS} rounds through the containers")
    start = time.perf_counter()
    flwr(home, "run", str(REPO), "federa", "--stream", "--run-config",
         to_flwr_overrides(config), timeout=1800)  # fmt: skip
    report["flwr_run_seconds"] = time.perf_counter() - start
    label = f"label=com.docker.compose.project={PROJECT}"
    report["containers"] = docker("ps", "--filter", label, "--format", "{{.Names}}").split()
    run_dir = workdir / "cache" / "runs" / RUN_NAME
    report["run_dir_files"] = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    metrics = run_dir / "metrics.jsonl"
    report["metrics"] = [json.loads(x) for x in metrics.read_text().splitlines()] if (
        metrics.exists()) else []  # fmt: skip
    summary = run_dir / "summary.json"
    report["summary"] = json.loads(summary.read_text()) if summary.exists() else None
    report["compose_logs_tail"] = compose(workdir, "logs", "--no-color", "--tail", "15")[-6000:]


def deploy_local_rounds(workdir: Path) -> list[float]:
    """The same run with `federa deploy local` (2 nodes, TLS, process isolation, the same CSVs):
    its round seconds, for the containers-vs-processes comparison."""
    from federa_ops.deploy import deploy_local

    run_dir = deploy_local(
        nodes=2,
        overrides=dict(RUN_CONFIG),
        output_dir=workdir / "deploy-local-runs",
        app_dir=REPO,
        tls=True,
        isolation="process",
        node_data=[f"csv:{workdir / 'data' / f'node-{i}' / 'train.csv'}" for i in (1, 2)],
        log=lambda line: None,
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["round_seconds"] for r in rows[1:]]


def preflight() -> None:
    """Root, the package registries, then the Debian packages the check runs."""
    require_root("make docker-check")
    require_registries()
    ensure_debian_packages({"dockerd": "docker.io", "docker-compose": "docker-compose",
                            "debootstrap": "debootstrap"})  # fmt: skip


def run_check(report_path: Path, no_cache: bool = False, compare: bool = True) -> dict:
    """The whole check; writes and returns the report. Removes what it made, also on failure."""
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    preflight()
    CACHE.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="federa-docker-check-"))
    with docker_engine() as started_engine:
        report["engine_started_here"] = started_engine
        report["engine_version"] = docker("version", "--format", "{{.Server.Version}}").strip()
        try:
            start = time.perf_counter()
            build_flower_image()
            report["flower_base_seconds"] = time.perf_counter() - start
            report["build_seconds"] = build_federa_image(no_cache)
            report["build_seconds_cached"] = build_federa_image()
            report["image"] = image_facts(FEDERA_IMAGE)
            credential_hashes = prepare_workdir(workdir)
            report["image_scan"] = scan_image(FEDERA_IMAGE, credential_hashes)
            run_federation(workdir, report)
        finally:
            with contextlib.suppress(CheckError):
                compose(workdir, "down", "-v", "--remove-orphans", "--timeout", "20")
            report["leftovers"] = leftovers()
    report["engine_running_after"] = engine_answers()
    if compare and report.get("summary"):
        say("the same run with federa deploy local (processes, TLS, process isolation)")
        report["deploy_local_round_seconds"] = deploy_local_rounds(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    report["workdir_removed"] = not workdir.exists()
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    say(f"report: {report_path}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preflight", action="store_true", help="check root, registries, engine")
    parser.add_argument("--report", type=Path, default=CACHE / "docker-check.json")
    parser.add_argument("--no-cache", action="store_true", help="build the image from scratch")
    args = parser.parse_args()
    try:
        if args.preflight:
            preflight()
            with docker_engine():
                pass
            print("docker-check preflight: root, registries and a Docker engine: ok")
            return
        run_check(args.report, args.no_cache)
    except CheckError as error:
        fail(error)


if __name__ == "__main__":
    main()
