"""What `make docker-check` and `make arm64-check` share: preflight checks, Debian packages, the
host's Debian mirror, and running commands with one-line failures.

Operator tooling: it runs on the machine that hosts the checks, never on a node, and is not part
of the app bundle. It may import the app library (federa_app), never the other way round.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FEDERA_CHECK_CACHE", "/var/cache/federa-checks"))
SUITE = "bookworm"  # Debian 12: python3.11, the Python Flower's 1.42 images and this project use
# python3-pip brings python3-distutils, which python3.11-venv needs and debootstrap's resolver
# does not find by itself.
PYTHON_PACKAGES = ("python3.11", "python3.11-venv", "python3-pip", "ca-certificates")


class CheckError(Exception):
    """A precondition of a check is not met: one line saying which and what to do (exit 2)."""


def say(message: str) -> None:
    """A progress line (checks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: Sequence[str], *, timeout: float = 1800, check: bool = True, **kwargs) -> str:
    """Run a command, return its stdout; on failure a CheckError with its last output line."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, **kwargs
        )
    except subprocess.TimeoutExpired:
        raise CheckError(f"{' '.join(command[:3])} ... did not finish in {timeout:.0f} s") from None
    if check and done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip() or "(no output)").splitlines()[-1]
        raise CheckError(f"{' '.join(command[:4])} ... failed (exit {done.returncode}): {tail}")
    return done.stdout


def require_root(what: str) -> None:
    """Checks that start engines, mount file systems or chroot need root."""
    if os.geteuid() != 0:
        raise CheckError(
            f"{what} needs root (it {_ROOT_REASONS[what]}): run it as root or with sudo"
        )


_ROOT_REASONS = {
    "make docker-check": "starts a Docker engine and builds a root file system",
    "make arm64-check": "registers qemu with binfmt_misc, builds a root file system and chroots",
}


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (so the check reaches what apt reaches)."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(errors="replace")
        for uri in re.findall(r"(?m)^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    raise CheckError(
        "no Debian mirror in /etc/apt/sources.list(.d): the checks build Debian root file "
        "systems with debootstrap and need apt's mirror"
    )


def require_registries() -> None:
    """The Debian mirror and PyPI must answer: everything the checks build comes from them."""
    mirror = debian_mirror()
    try:
        urllib.request.urlopen(f"{mirror}/dists/{SUITE}/Release", timeout=15).close()
    except OSError as exc:
        raise CheckError(
            f"the Debian mirror {mirror} does not answer ({exc}): the check builds its images "
            "from Debian's packages; run it where apt-get works"
        ) from None
    probe = [sys.executable, "-m", "pip", "index", "versions", "flwr", "--isolated"]
    done = subprocess.run(
        [*probe, "--timeout", "15", "--retries", "0"], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0 or "1.42.0" not in done.stdout:
        raise CheckError(
            "PyPI does not answer (pip index versions flwr failed): the check installs flwr, "
            "torch and this project's dependencies from PyPI; run it where pip install works"
        )


def ensure_debian_packages(packages: dict[str, str]) -> None:
    """Install the Debian packages whose command is missing ({command: package})."""
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if not missing:
        return
    say(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], env=env)


def debootstrap(target: Path, arch: str, include: Sequence[str]) -> None:
    """A minimal Debian root file system in `target` (a foreign arch runs its second stage under
    qemu). Made in a temporary sibling and renamed, so an interrupted build leaves no half tree."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    native = arch == host_debian_arch()
    command = [
        "debootstrap",
        f"--arch={arch}",
        "--variant=minbase",
        *(["--foreign"] * (not native)),
    ]
    command += [f"--include={','.join(include)}", SUITE, str(partial), debian_mirror()]
    say(f"debootstrap {arch} {SUITE} into {partial} (minutes)")
    try:
        run(command, timeout=3600)
        if not native:
            run(
                ["chroot", str(partial), "/debootstrap/debootstrap", "--second-stage"], timeout=3600
            )
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def host_debian_arch() -> str:
    """This machine's Debian architecture name (amd64, arm64)."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def fail(error: CheckError) -> None:
    """Print the one-line reason and exit 2 (bad environment, nothing was run)."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def write_node_csvs(paths: Sequence[Path], rows_per_node: int, seed: int) -> None:
    """Each node's own CSV file (text,label with label names): disjoint slices of a shuffled
    rotten-tomatoes train split, so that the nodes' data differ as on real devices."""
    from federa_app.data import loading

    train, _, labels = loading.load_task("rotten-tomatoes", 0.2, 42)
    rows = train.shuffle(seed=seed).select(range(len(paths) * rows_per_node))
    for i, path in enumerate(paths):
        part = rows.select(range(i * rows_per_node, (i + 1) * rows_per_node)).to_pandas()
        part["label"] = [labels[k] for k in part["label"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        part[["text", "label"]].to_csv(path, index=False)
