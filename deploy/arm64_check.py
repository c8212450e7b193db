"""`make arm64-check`: an arm64 SuperNode (emulated by qemu) and an x86 one train FeDeRA together.

1. An arm64 environment, built once and cached: a Debian bookworm arm64 root file system
   (debootstrap; its second stage runs under qemu-user-static through binfmt_misc) and a
   virtualenv with this project's dependencies for arm64. The wheels are resolved and unpacked by
   this machine's pip for the arm64 platform tags (`pip install --target --platform ...`):
   installing under emulation would take an hour, the files are the same. PyPI's arm64 torch
   2.13.0 is a CUDA build: its nvidia-* libraries come too, or `import torch` fails (~5 GB).
2. `federa deploy local` with 2 nodes and TLS + node authentication on loopback: the SuperLink,
   the ServerApp and SuperNode 1 run natively (x86_64); SuperNode 2 runs in the arm64 root
   (`chroot`, so every arm64 instruction is emulated), with /proc, /dev, /tmp and the asset cache
   bind-mounted at the same paths. Each node has its own key and CSV file.
3. A 2-round FeDeRA run with a tiny workload (batch 2 x 16 tokens, one local step): the per-node
   reports in metrics.jsonl say which machine trained and the digest of its frozen residual.

Emulated times are qemu's, not an arm64 device's. The facts go to a JSON report that
tests/test_arm64.py (marker `arm64`) asserts on. Everything mounted is unmounted, every process
started is stopped, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

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

ROOTFS = CACHE / "arm64-rootfs"
VENV = Path("/opt/venv")  # inside the root
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# The project's dependencies (pyproject.toml) for a node: flwr without the simulation extra (Ray
# is the simulation engine's; a SuperNode does not need it).
REQUIREMENTS = (
    "torch==2.13.0",
    "flwr==1.42.0",
    "flwr-datasets==0.6.1",
    "datasets>=4,<5",
    "transformers>=5.0,<6",
    "peft==0.21.2",
    "safetensors",
    "matplotlib>=3.8",
    "pandas>=2",
    "psutil>=5.9",
)
NODE_ROWS = 64
RUN_CONFIG = {
    "method": "federa",
    "num-server-rounds": 2,
    "local-steps": 1,
    "batch-size": 2,
    "max-length": 16,
    "eval-max-examples": 100,
    "min-train-nodes": 2,
    "min-available-nodes": 2,
    "seed": 42,
}


def aarch64_platform_args() -> list[str]:
    """pip's --platform tags an arm64 bookworm (glibc 2.36) accepts, newest first."""
    tags = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)]
    tags += ["manylinux2014_aarch64", "linux_aarch64"]
    return [arg for tag in tags for arg in ("--platform", tag)]


def ensure_binfmt() -> bool:
    """qemu-aarch64 registered with binfmt_misc; True if binfmt_misc was mounted here."""
    mounted = False
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        mounted = True
    if (
        not (BINFMT / "qemu-aarch64").exists()
        or "enabled" not in (BINFMT / "qemu-aarch64").read_text()
    ):
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    return mounted


def environment_stamp() -> str:
    """What the cached environment was built from: a change rebuilds the virtualenv."""
    return hashlib.sha256(json.dumps([REQUIREMENTS, aarch64_platform_args()]).encode()).hexdigest()


def build_environment() -> float:
    """The arm64 root and its virtualenv (cached); the project itself is reinstalled each time.
    Returns the seconds spent building (0 when the cache was used)."""
    start, built = time.perf_counter(), False
    if not ROOTFS.is_dir():
        debootstrap(ROOTFS, "arm64", PYTHON_PACKAGES)
        built = True
    venv = ROOTFS / VENV.relative_to("/")
    stamp = venv / ".federa-stamp"
    site = venv / "lib" / "python3.11" / "site-packages"
    if not stamp.exists() or stamp.read_text() != environment_stamp():
        shutil.rmtree(venv, ignore_errors=True)
        say("arm64 virtualenv: python3.11 -m venv under qemu")
        run(
            ["chroot", str(ROOTFS), "/usr/bin/python3.11", "-m", "venv", "--without-pip", str(VENV)]
        )
        say("arm64 virtualenv: the dependencies' arm64 wheels (~5 GB with torch's CUDA libraries)")
        pip_target(site, list(REQUIREMENTS))
        stamp.write_text(environment_stamp())
        built = True
    seconds = time.perf_counter() - start if built else 0.0
    say("arm64 virtualenv: this project")
    pip_target(site, ["--no-deps", "--upgrade", str(REPO)])
    return seconds


def pip_target(site: Path, args: list[str]) -> None:
    """Install arm64 wheels into `site` with this machine's pip; fix the scripts' interpreter."""
    command = [sys.executable, "-m", "pip", "install", "--no-compile", "--quiet", "--target",
               str(site), *aarch64_platform_args(), "--only-binary=:all:", "--python-version",
               "3.11", "--implementation", "cp", "--abi", "cp311", *args]  # fmt: skip
    run(command, timeout=3600)
    scripts, bin_dir = site / "bin", site.parent.parent.parent / "bin"
    for script in scripts.glob("*") if scripts.is_dir() else []:
        text = script.read_bytes()
        if text.startswith(b"#!") and b"python" in text.split(b"\n", 1)[0]:
            text = b"#!" + str(VENV / "bin" / "python").encode() + b"\n" + text.split(b"\n", 1)[1]
        target = bin_dir / script.name
        target.write_bytes(text)
        target.chmod(0o755)
        script.unlink()
    if scripts.is_dir():
        scripts.rmdir()
    # Byte-compile here, natively (.pyc files do not depend on the CPU): compiling on first import
    # under qemu made flwr-clientapp start too slowly for Flower, which gives a started ClientApp
    # 30 s (HEARTBEAT_DEFAULT_INTERVAL) to report in before it starts another one.
    run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)], timeout=3600, check=False)


@contextlib.contextmanager
def bind_mounts(paths: list[Path]) -> Iterator[list[Path]]:
    """Bind-mount each host path at the same path inside the arm64 root; unmount on the way out.
    Not /sys: with the host's /sys in the root, `import peft` segfaulted under qemu 7.2."""
    done: list[Path] = []
    try:
        for path in paths:
            target = ROOTFS / path.relative_to("/")
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", "--bind", str(path), str(target)])
            done.append(target)
        yield done
    finally:
        for target in reversed(done):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", str(target)], capture_output=True)


def arm64_mounts() -> list[str]:
    """What is mounted inside the arm64 root now (must be empty after the check)."""
    root = str(ROOTFS)
    lines = Path("/proc/mounts").read_text().splitlines()
    return [line.split()[1] for line in lines if line.split()[1].startswith(root + "/")]


def preflight() -> None:
    """Root, the package registries, then the Debian packages the check runs."""
    require_root("make arm64-check")
    require_registries()
    commands = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support"}
    ensure_debian_packages({**commands, "debootstrap": "debootstrap"})


def run_check(report_path: Path) -> dict:
    """The whole check; writes and returns the report."""
    from federa_app.data import assets
    from federa_app.records.run_dir import read_metrics
    from federa_ops.deploy import NodeNetwork, deploy_local

    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    preflight()
    CACHE.mkdir(parents=True, exist_ok=True)
    mounted_binfmt = ensure_binfmt()
    try:
        report["environment_build_seconds"] = build_environment()
        workdir = Path(tempfile.mkdtemp(prefix="federa-arm64-check-"))
        paths = [workdir / f"node-{i}.csv" for i in (1, 2)]
        write_node_csvs(paths, NODE_ROWS, seed=11)
        node_data = [f"csv:{path}" for path in paths]
        # The arm64 node sees the deployment's files (under /tmp) and the asset cache at the
        # same paths as the x86 processes do.
        shared = [Path("/proc"), Path("/dev"), Path(tempfile.gettempdir()), assets.federa_home()]
        arm64 = NodeNetwork(
            prefix=(
                "chroot",
                str(ROOTFS),
                "/usr/bin/env",
                f"PATH={VENV}/bin:/usr/bin:/bin",
                f"HOME={Path.home()}",
            ),  # fmt: skip
            bin_dir=VENV / "bin",
        )
        lines: list[str] = []

        def log(line: str) -> None:
            lines.append(line)
            say(line)

        start = time.perf_counter()
        try:
            with bind_mounts(shared):
                run_dir = deploy_local(
                    nodes=2,
                    overrides=dict(RUN_CONFIG),
                    output_dir=workdir / "runs",
                    app_dir=REPO,
                    tls=True,
                    node_data=node_data,
                    log=log,
                    networks=[NodeNetwork(), arm64],
                )
            report["run_seconds"] = time.perf_counter() - start
            report["metrics"] = read_metrics(run_dir)
            report["summary"] = json.loads((run_dir / "summary.json").read_text())
            report["run_files"] = sorted(p.name for p in run_dir.iterdir())
        finally:
            report["progress"] = lines
            report["mounts_after"] = arm64_mounts()
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if mounted_binfmt:
            subprocess.run(["umount", str(BINFMT)], capture_output=True)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    say(f"report: {report_path}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preflight", action="store_true", help="check root, registries, qemu")
    parser.add_argument("--report", type=Path, default=CACHE / "arm64-check.json")
    args = parser.parse_args()
    try:
        if args.preflight:
            preflight()
            print("arm64-check preflight: root, registries and qemu-user-static: ok")
            return
        run_check(args.report)
    except CheckError as error:
        fail(error)


if __name__ == "__main__":
    main()
