"""The Dockerfile, .dockerignore and compose.yaml, checked without a Docker engine (none runs here).

What an engine would find at build or start time is checked against the repository and the
installed Flower 1.42: every COPY source exists and is in the build context, the copied files
build the package with pyproject.toml's dependencies and carry no data or weights, the pins agree
with pyproject.toml, and every flower-* flag in compose.yaml is one the installed CLI accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.parser import Parser
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.common.config import parse_config_args
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from federa_ops import certs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLWR = installed_version("flwr")
FLOWER_CLIS = ("flower-superlink", "flower-supernode", "flower-superexec")
PATH_FLAGS = (
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--root-certificates",
    "--auth-supernode-private-key",
)
# Weights, data, archives and key material: none of it belongs in the image.
FORBIDDEN_SUFFIXES = {
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".npz", ".npy",
    ".csv", ".tsv", ".jsonl", ".parquet", ".arrow", ".bz2", ".gz", ".zip", ".whl", ".tar",
    ".key", ".pem", ".crt",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reading the files


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword and the rest of its (joined) lines."""

    cmd: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments and blank lines dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """Default value of every ARG that has one."""
    defaults = {}
    for ins in instructions:
        if ins.cmd == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """Every ENV KEY=VALUE pair."""
    env = {}
    for ins in (i for i in instructions if i.cmd == "ENV"):
        for pair in shlex.split(ins.args):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {ins.args!r}: use the KEY=VALUE form"
            env[key] = value
    return env


def copy_args(ins: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY/ADD, flags dropped; shell or JSON form."""
    args = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
    args = [a for a in args if not a.startswith("--")]
    return args[:-1], args[-1]


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, in order (the last match wins)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exception, re.compile(_glob_regex(pattern))))
    return rules


def _glob_regex(pattern: str) -> str:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regex."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def is_ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `rel` (posix, relative to the context) is left out, matching it or a parent."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not exception
    return ignored


def context_files(source: str, rules: list[tuple[bool, re.Pattern[str]]]) -> Iterator[Path]:
    """The files of one COPY source that the build context holds."""
    path = ROOT / source
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in candidates:
        if not is_ignored(file.relative_to(ROOT).as_posix(), rules):
            yield file


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def requirements(pyproject: dict[str, Any]) -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in pyproject["project"]["dependencies"])
    return {canonicalize_name(r.name): r for r in reqs}


@pytest.fixture(scope="module")
def flwr_pin(requirements: dict[str, Requirement]) -> str:
    """The one version pyproject.toml pins flwr to."""
    (spec,) = requirements["flwr"].specifier
    assert spec.operator == "==", f"flwr is not pinned: {requirements['flwr']}"
    return spec.version


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml with every `${VAR:-default}` read as its default (what users get)."""
    text = (ROOT / "compose.yaml").read_text()
    return yaml.safe_load(re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text))


def test_compose_images_are_overridable_and_default_to_flowers() -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert "${FLWR_SUPERLINK_IMAGE:-flwr/superlink:" in text
    assert "${FLWR_SUPERNODE_IMAGE:-flwr/supernode:" in text
    assert "${FEDERA_IMAGE:-federa-superexec}" in text


@pytest.fixture(scope="module")
def cli_help() -> dict[str, dict[str, str]]:
    """flag -> help text, per flower-* command, from the installed CLI's --help."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def run(cli: str) -> str:
        done = subprocess.run(
            [str(BIN / cli), "--help"], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, f"{cli} --help failed:\n{done.stderr}"
        return done.stdout

    with ThreadPoolExecutor(len(FLOWER_CLIS)) as pool:
        texts = dict(zip(FLOWER_CLIS, pool.map(run, FLOWER_CLIS), strict=True))
    return {cli: parse_help(text) for cli, text in texts.items()}


def parse_help(text: str) -> dict[str, str]:
    """argparse's `options:` section as flag -> the option's whole entry."""
    options = text.split("options:", 1)[1]
    entries = re.split(r"\n(?=  -)", options)
    flags: dict[str, str] = {}
    for entry in entries:
        head = entry.strip().split("  ", 1)[0]
        for flag in re.findall(r"--[a-z0-9][a-z0-9-]*", head):
            flags[flag] = " ".join(entry.split())
    return flags


def cli_args(service: dict[str, Any]) -> tuple[str, list[str]]:
    """(the flower-* command, its arguments) of a compose service."""
    entrypoint = service["entrypoint"]
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint
    command = service.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else command
    return entrypoint[0], [*entrypoint[1:], *(str(a) for a in command)]


def option(args: list[str], flag: str) -> str | None:
    """The value given to `flag` (`--flag value` or `--flag=value`), or None."""
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def services_running(compose: dict[str, Any], cli: str) -> dict[str, list[str]]:
    """name -> arguments, for the services whose entrypoint is `cli`."""
    found = {}
    for name, service in compose["services"].items():
        command, args = cli_args(service)
        if command == cli:
            found[name] = args
    return found


def mounted_paths(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> what is mounted there ("secret:NAME", "volume:NAME", "bind:./PATH")."""
    mounts = {}
    for secret in service.get("secrets") or []:
        source = secret if isinstance(secret, str) else secret["source"]
        target = secret if isinstance(secret, str) else secret.get("target", source)
        mounts[target if target.startswith("/") else f"/run/secrets/{target}"] = f"secret:{source}"
    for volume in service.get("volumes") or []:
        source, target = volume.split(":")[:2]
        kind = "bind" if source.startswith((".", "/")) else "volume"
        mounts[target] = f"{kind}:{source}"
    return mounts


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_single_stage_from_flower_image_at_pyproject_pin(
    dockerfile: list[Instruction], pyproject: dict[str, Any], flwr_pin: str
) -> None:
    froms = [ins.args for ins in dockerfile if ins.cmd == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, FROM the BASE_IMAGE build argument"
    base = arg_defaults(dockerfile)["BASE_IMAGE"]
    repo, _, tag = base.partition(":")
    assert repo in ("flwr/superexec", "flwr/supernode")
    # Flower's unsuffixed tags are Python 3.13: the tag must name a Python this project allows.
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d+\.\d+)-[a-z]+[\d.]+", tag)
    assert match, f"{base}: expected a tag like {flwr_pin}-py3.11-ubuntu24.04"
    assert match[1] == flwr_pin
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(match[2])
    assert flwr_pin == FLWR, "the CLI checks below read the installed flwr"


def test_torch_pin_satisfies_pyproject_and_matches_makefile(
    dockerfile: list[Instruction], requirements: dict[str, Requirement]
) -> None:
    torch = Requirement(arg_defaults(dockerfile)["TORCH_SPEC"])
    assert canonicalize_name(torch.name) == "torch"
    (pin,) = torch.specifier
    assert pin.operator == "=="
    assert requirements["torch"].specifier.contains(pin.version), (
        f"TORCH_SPEC {torch} is outside pyproject.toml's {requirements['torch']}"
    )
    makefile_pins = set(re.findall(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()))
    assert makefile_pins == {pin.version}


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: list[Instruction]) -> None:
    rules = dockerignore_rules()
    copies = [ins for ins in dockerfile if ins.cmd in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        assert ins.cmd == "COPY", "ADD fetches URLs and unpacks archives: use COPY"
        assert "--from" not in ins.args
        sources, _ = copy_args(ins)
        for source in sources:
            assert not re.search(r"[*?~$]", source) and source not in (".", "./")
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert not is_ignored(source, rules), f"COPY {source}: excluded by .dockerignore"
            assert list(context_files(source, rules)), f"COPY {source}: nothing in the context"


def test_build_context_holds_only_what_is_copied(dockerfile: list[Instruction]) -> None:
    rules = dockerignore_rules()
    copied = {
        Path(s).parts[0] for ins in dockerfile if ins.cmd == "COPY" for s in copy_args(ins)[0]
    }
    in_context = {p.name for p in ROOT.iterdir() if not is_ignored(p.name, rules)}
    assert in_context == copied
    for left_out in (
        "certs/server.key",
        "data/node-1/train.csv",
        "runs/run-1/summary.json",
        ".venv/bin/python",
        ".git/config",
        "tests/test_docker.py",
        "federa_app/__pycache__/cli.cpython-311.pyc",
        "federa_app/model.safetensors",
        "simulation/mine.csv",
    ):
        assert is_ignored(left_out, rules), left_out
    assert not is_ignored("federa_app/federation/client.py", rules)
    assert not is_ignored("simulation/presets/smoke.toml", rules)


def _image_tree(dockerfile: list[Instruction], root: Path) -> None:
    """Lay the COPYed files out under `root` as the image would hold them."""
    rules = dockerignore_rules()
    for ins in (i for i in dockerfile if i.cmd == "COPY"):
        sources, dest = copy_args(ins)
        for source in sources:
            for file in context_files(source, rules):
                if (ROOT / source).is_dir():
                    target = root / dest.lstrip("/") / file.relative_to(ROOT / source)
                elif dest.endswith("/") or len(sources) > 1:
                    target = root / dest.lstrip("/") / file.name
                else:
                    target = root / dest.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)


def test_image_gets_no_weights_data_or_secrets(
    dockerfile: list[Instruction], tmp_path: Path
) -> None:
    _image_tree(dockerfile, tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if p.suffix in FORBIDDEN_SUFFIXES]
    assert sum(p.stat().st_size for p in files) < 5_000_000
    assert not [ins for ins in dockerfile if ".cache" in ins.args and ins.cmd == "COPY"]


def test_copied_files_build_the_project_with_pyproject_dependencies(
    dockerfile: list[Instruction], pyproject: dict[str, Any], tmp_path: Path
) -> None:
    """pip installs the COPY destination of pyproject.toml, and that tree builds the package."""
    (pyproject_copy,) = [
        ins for ins in dockerfile if ins.cmd == "COPY" and "pyproject.toml" in copy_args(ins)[0]
    ]
    project_dir = copy_args(pyproject_copy)[1].rstrip("/")
    runs = " ; ".join(ins.args for ins in dockerfile if ins.cmd == "RUN")
    installs = re.findall(r"pip install ([^;&|]*)", runs)
    # torch, the project's dependencies (the project with empty packages), the project itself
    assert len(installs) == 3, f"torch and the project, nothing else: {installs}"
    assert any(re.fullmatch(r'.*"\$\{TORCH_SPEC\}"\s*', i) for i in installs)
    assert any(re.fullmatch(rf"{re.escape(project_dir)}\s*", i) for i in installs)
    assert any(re.fullmatch(rf"--no-deps\s+{re.escape(project_dir)}\s*", i) for i in installs)
    assert re.search(r'if \[ -n "\$\{TORCH_SPEC\}" \]', runs), "TORCH_SPEC= must skip torch"

    _image_tree(dockerfile, tmp_path / "image")
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--quiet", "--wheel-dir", str(wheels), str(tmp_path / "image" / project_dir[1:])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n for n in names if n.endswith(".dist-info/METADATA")).rpartition("/")[0]
        metadata = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    built = {str(Requirement(r)) for r in metadata.get_all("Requires-Dist") or []}
    declared = {str(Requirement(r)) for r in pyproject["project"]["dependencies"]}
    assert {r for r in built if "extra ==" not in r} == declared
    assert "federa_app/federation/client.py" in names
    assert any(n.startswith("simulation/presets/") and n.endswith(".toml") for n in names)
    assert "federa = federa_ops.cli:main" in entry_points


def test_runs_as_non_root_with_the_cache_as_a_volume(
    dockerfile: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [(i, ins.args) for i, ins in enumerate(dockerfile) if ins.cmd == "USER"]
    assert users, "set the user explicitly"
    last_index, last_user = users[-1]
    assert last_user.split(":")[0] not in ("root", "0"), "the image must not end as root"
    assert all(ins.cmd != "RUN" for ins in dockerfile[last_index:])

    env = env_values(dockerfile)
    volumes = [v for ins in dockerfile if ins.cmd == "VOLUME" for v in json.loads(ins.args)]
    assert volumes == [env["FEDERA_HOME"]]
    from federa_app.data import assets

    monkeypatch.setenv("FEDERA_HOME", env["FEDERA_HOME"])
    assert assets.federa_home() == Path(env["FEDERA_HOME"]), "the code must read this variable"


def test_environment_turns_off_what_a_device_cannot_do(dockerfile: list[Instruction]) -> None:
    from flwr.common.constant import FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
    from flwr.supercore.constant import FLWR_DISABLE_UPDATE_CHECK

    env = env_values(dockerfile)
    assert env[FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION] == "1"
    assert env[FLWR_DISABLE_UPDATE_CHECK] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "superlink",
        "superexec-serverapp",
        "supernode-1",
        "superexec-clientapp-1",
        "supernode-2",
        "superexec-clientapp-2",
    }
    assert set(services_running(compose, "flower-superlink")) == {"superlink"}
    assert len(services_running(compose, "flower-supernode")) == 2
    assert len(services_running(compose, "flower-superexec")) == 3


def test_compose_images_match_the_flwr_pin_and_the_dockerfile(
    compose: dict[str, Any], flwr_pin: str
) -> None:
    own_images = set()
    for name, service in compose["services"].items():
        command, _ = cli_args(service)
        if command == "flower-superexec":
            assert service["build"] in (".", {"context": "."}), f"{name}: build the Dockerfile"
            own_images.add(service["image"])
        else:
            repo, _, tag = service["image"].partition(":")
            assert repo == f"flwr/{command.removeprefix('flower-')}", name
            assert tag.split("-")[0] == flwr_pin, f"{name}: {service['image']}"
    assert len(own_images) == 1, "every SuperExec runs the one project image"


def test_compose_flags_exist_in_installed_flower_cli(
    compose: dict[str, Any], cli_help: dict[str, dict[str, str]]
) -> None:
    for name, service in compose["services"].items():
        command, args = cli_args(service)
        assert command in cli_help, f"{name}: {command} is not a Flower command"
        for arg in (a.split("=", 1)[0] for a in args if a.startswith("-")):
            assert arg in cli_help[command], f"{name}: {command} {FLWR} has no {arg}"
            assert "deprecated" not in cli_help[command][arg].lower(), f"{name}: {arg}"
        assert "--allow-runtime-dependency-installation" not in args, name
        if command != "flower-superexec":
            isolation = option(args, "--isolation")
            assert isolation == "process", f"{name}: the SuperExecs run the apps"
            assert "{subprocess,process}" in cli_help[command]["--isolation"]


def test_compose_addresses_and_ports_are_consistent(compose: dict[str, Any]) -> None:
    (link_args,) = services_running(compose, "flower-superlink").values()
    link_port = option(link_args, "--port")
    assert option(link_args, "--host") == "0.0.0.0", "other containers must reach the SuperLink"
    assert f"{link_port}:{link_port}" in compose["services"]["superlink"]["ports"]

    nodes = services_running(compose, "flower-supernode")
    node_ports = {name: option(args, "--port") for name, args in nodes.items()}
    assert len(set(node_ports.values())) == len(nodes), f"distinct ports: {node_ports}"
    for name, args in nodes.items():
        assert option(args, "--superlink") == f"superlink:{link_port}", name
        assert option(args, "--host") == "0.0.0.0", f"{name}: its SuperExec must reach it"

    targets = {}
    for name, args in services_running(compose, "flower-superexec").items():
        host, _, port = option(args, "--runtime-api-address").rpartition(":")
        targets[name] = host
        target_args = link_args if host == "superlink" else nodes[host]
        assert port == (link_port if host == "superlink" else node_ports[host]), name
        # TLS towards a Runtime API exactly when that API serves TLS.
        tls = option(target_args, "--ssl-certfile") is not None
        assert ("--insecure" in args) != tls, name
        assert (option(args, "--root-certificates") is not None) == tls, name
        assert host in compose["services"][name]["depends_on"], name
    assert sorted(targets.values()) == sorted(["superlink", *nodes]), "one SuperExec each"


def test_compose_tls_and_node_authentication(compose: dict[str, Any]) -> None:
    (link_args,) = services_running(compose, "flower-superlink").values()
    assert "--insecure" not in link_args
    assert "--enable-supernode-auth" in link_args
    for name, args in services_running(compose, "flower-supernode").items():
        assert "--insecure" not in args, name
        assert option(args, "--root-certificates"), name
        assert option(args, "--auth-supernode-private-key"), name
    for name, service in compose["services"].items():
        _, args = cli_args(service)
        mounts = mounted_paths(service)
        for flag in PATH_FLAGS:
            path = option(args, flag)
            if path is not None:
                assert mounts.get(path, "").startswith("secret:"), f"{name}: {flag} {path}"
    key_sources = [
        mounted_paths(compose["services"][name])[option(args, "--auth-supernode-private-key")]
        for name, args in services_running(compose, "flower-supernode").items()
    ]
    assert len(set(key_sources)) == len(key_sources), "each SuperNode has its own key"


def test_compose_certificate_files_follow_federa_certs(compose: dict[str, Any]) -> None:
    files = {name: Path(spec["file"]) for name, spec in compose["secrets"].items()}
    assert {f.parent for f in files.values()} == {Path("certs")}
    nodes = len(services_running(compose, "flower-supernode"))
    expected = {certs.CA_CERT, certs.SERVER_CERT, certs.SERVER_KEY}
    expected |= {certs.node_key_name(i) for i in range(1, nodes + 1)}
    assert {f.name for f in files.values()} == expected


def test_compose_node_config_and_node_data(compose: dict[str, Any]) -> None:
    nodes = services_running(compose, "flower-supernode")
    superexec_of = {
        option(args, "--runtime-api-address").rpartition(":")[0]: name
        for name, args in services_running(compose, "flower-superexec").items()
    }
    partition_ids = []
    for name, args in nodes.items():
        node_config = parse_config_args([option(args, "--node-config")])
        partition_ids.append(node_config["partition-id"])
        assert node_config["num-partitions"] == len(nodes), name
        kind, _, path = node_config["data"].partition(":")
        assert kind in ("csv", "json") and path.startswith("/"), name
        # The ClientApp runs in the node's SuperExec: the file must be mounted there.
        executor = compose["services"][superexec_of[name]]
        mounts = [v.split(":") for v in executor.get("volumes") or []]
        holding = [m for m in mounts if path.startswith(m[1].rstrip("/") + "/")]
        assert holding and holding[0][0].startswith("./"), f"{name}: {path} is not mounted"
        assert holding[0][2:] == ["ro"], f"{name}: mount node data read-only"
    assert sorted(partition_ids) == list(range(len(nodes)))


def test_compose_cache_volume_and_host_paths(
    compose: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    federa_home = env_values(dockerfile)["FEDERA_HOME"]
    rules = dockerignore_rules()
    docs = (ROOT / "docs" / "docker.md").read_text()
    for name in services_running(compose, "flower-superexec"):
        mounts = mounted_paths(compose["services"][name])
        kind, _, volume = mounts.get(federa_home, "").partition(":")
        assert kind == "volume" and volume in compose["volumes"], f"{name}: mount the cache"
    host_paths = [
        m.split(":", 1)[1]
        for service in compose["services"].values()
        for m in mounted_paths(service).values()
        if m.startswith("bind:")
    ] + [spec["file"] for spec in compose["secrets"].values()]
    for host_path in host_paths:
        assert host_path.startswith("./"), f"{host_path}: relative to the repository"
        rel = os.path.normpath(host_path)
        if (ROOT / rel).exists() and not is_ignored(rel, rules):
            continue  # a file of the repository
        # A file the user provides: documented, and never sent to the image builder.
        top = rel.split("/")[0]
        assert top in ("certs", "data"), host_path
        assert is_ignored(rel, rules), f"{host_path} would be sent to the image builder"
        assert f"{top}/" in docs, f"docs/docker.md does not say how to make {host_path}"


def test_docs_name_only_existing_services_and_the_published_port(
    compose: dict[str, Any],
) -> None:
    docs = (ROOT / "docs" / "docker.md").read_text()
    named = set(re.findall(r"\b(superlink|supernode-\d+|superexec-[a-z]+(?:-\d+)?)\b", docs))
    assert named >= set(compose["services"]), "document every service"
    assert named <= set(compose["services"]) | {"superexec-clientapp"}
    (link_args,) = services_running(compose, "flower-superlink").values()
    addresses = re.findall(r'address = "([^"]+)"', docs)
    assert addresses and all(a.endswith(f":{option(link_args, '--port')}") for a in addresses)
