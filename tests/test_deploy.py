"""Flower's Deployment Engine on loopback: credentials, `federa deploy local`, TLS and node
authentication, refused nodes, and a SuperNode that dies mid-run."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import check_run_directory, write_toy_csv
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.hazmat.primitives.serialization.ssh import (
    load_ssh_private_key,
    load_ssh_public_key,
)

from federa_app.errors import ConfigError
from federa_ops import runtime
from federa_ops.certs import make_credentials
from federa_ops.cli import main
from federa_ops.deploy import Deployment, online_nodes, register_node, start_node, start_superlink

FEDERA = Path(sys.executable).parent / "federa"


def test_certificates_chain_to_the_ca_and_node_keys_are_what_flower_accepts(tmp_path):
    creds = make_credentials(tmp_path / "c", nodes=2, sans=("192.168.1.10", "link.example.org"))
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.1.10")]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org"]
    server_key = load_pem_private_key(creds.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()

    from flwr.cli.supernode.register import (
        try_load_public_key,
    )  # what `flwr supernode register` runs

    for index, key_file in enumerate(creds.node_keys, 1):
        private = load_ssh_private_key(key_file.read_bytes(), None)
        public = load_ssh_public_key(creds.node_public_key(index).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert try_load_public_key(creds.node_public_key(index))  # Flower's own check passes
        assert key_file.stat().st_mode & 0o777 == 0o600
    assert creds.ca_cert.parent.joinpath("ca.key").stat().st_mode & 0o777 == 0o600


def test_bad_certificate_requests_are_one_line_and_overwrite_nothing(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'bad host!' is neither an IP address nor a DNS name"):
        make_credentials(tmp_path / "new", sans=("localhost", "bad host!"))
    assert not (tmp_path / "new").exists()  # checked before anything was written

    creds = make_credentials(tmp_path / "c", nodes=1)
    before = {p.name: p.read_bytes() for p in creds.directory.iterdir()}
    assert main(["certs", str(creds.directory), "--nodes", "1"]) == 2
    assert "already holds ca.crt" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in creds.directory.iterdir()}
    assert main(["certs", str(tmp_path / "d"), "--nodes", "-1"]) == 2
    assert "--nodes -1 must be >= 0" in capsys.readouterr().err


def test_deploy_rejects_bad_options_before_starting_anything(tmp_path, capsys):
    assert main(["deploy", "local", "--isolation", "docker", "--output-dir", str(tmp_path)]) == 2
    assert "--isolation 'docker' is not one of: subprocess, process" in capsys.readouterr().err
    args = ["deploy", "local", "--nodes", "2", "--node-data", "csv:/x.csv"]
    assert main([*args, "--output-dir", str(tmp_path)]) == 2
    assert "--node-data was given 1 times for --nodes 2" in capsys.readouterr().err
    assert main(["deploy", "local", "--run-config", "dataset=nope", "--output-dir", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_unregistered_and_plain_text_supernodes_are_refused(tmp_path):
    creds = make_credentials(tmp_path / "certs", nodes=2)
    dep = Deployment(tmp_path, runtime.free_port(), creds, runtime.flower_env(tmp_path))
    runtime.write_connection(tmp_path, f"127.0.0.1:{dep.port}", creds.ca_cert)
    plain = None
    try:
        start_superlink(dep, "subprocess")
        register_node(dep, 1)  # supernode-2's key is never registered
        registered = start_node(dep, 1, 2, "subprocess", None, creds.node_keys[0])
        unregistered = start_node(dep, 2, 2, "subprocess", None, creds.node_keys[1])
        dep.nodes = [registered, unregistered]
        plain = runtime.start(
            [str(runtime.BIN_DIR / "flower-supernode"), "--insecure", "--superlink",
             f"127.0.0.1:{dep.port}", "--port", str(runtime.free_port()), "--max-retries", "2"],
            tmp_path / "plain.log", dep.env, tmp_path,
        )  # fmt: skip
        _wait(lambda: online_nodes(dep) == 1, 60, "the registered node")  # the setup works
        assert unregistered.process.wait(timeout=60) != 0
        assert plain.wait(timeout=120) != 0
        assert registered.process.poll() is None and online_nodes(dep) == 1
        listed = json.loads(dep.flwr("supernode", "list", "--format", "json").stdout)["nodes"]
        assert len(listed) == 1  # the refused nodes never joined
    finally:
        runtime.stop(plain)
        dep.stop()
    assert "Giving up reconnection" in (tmp_path / "plain.log").read_text()
    assert "Failed to activate SuperNode" in unregistered.log_file.read_text()


def _run_deploy(args: list[str], on_output=None) -> tuple[int, str, set[psutil.Process]]:
    """Run `federa deploy local ...` as a user would; return its exit code, output and every
    process it started (seen while it ran)."""
    proc = subprocess.Popen(
        [str(FEDERA), "deploy", "local", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: set[psutil.Process] = set()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if on_output:
                on_output(line, proc)

    reader = threading.Thread(target=read)
    reader.start()
    while proc.poll() is None:
        try:
            seen.update(psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.5)
    reader.join()
    return proc.returncode, "".join(lines), seen


def _still_running(processes: set[psutil.Process]) -> list[str]:
    time.sleep(1)
    return [
        " ".join(p.cmdline()[:2]) for p in processes if p.is_running() and p.status() != "zombie"
    ]


@pytest.mark.integration
def test_tls_deployment_of_three_nodes_trains_the_real_model(tmp_path):
    config = "num-server-rounds=2 local-steps=3 eval-max-examples=200 max-length=32 run-name=tls"
    config += " min-train-nodes=3 min-available-nodes=3"
    code, output, started = _run_deploy(
        ["--nodes", "3", "--tls", "--output-dir", str(tmp_path), "--run-config", config]
    )
    assert code == 0, output
    assert "TLS + node authentication" in output and "3 SuperNodes online" in output
    run_dir = tmp_path / "tls"
    rows, summary = check_run_directory(run_dir, 2)
    assert [(r["clients"], r["failures"]) for r in rows[1:]] == [(3, 0), (3, 0)]
    assert summary["model"] == "minilm-l6" and summary["failures_total"] == 0
    assert json.loads((run_dir / "config.json").read_text())["num-nodes"] == 3
    assert "running on https://" in (run_dir / "logs" / "superlink.log").read_text()
    assert not _still_running(started)


def test_a_supernode_killed_in_round_one_costs_only_its_own_updates(tmp_path, tiny_bert):
    csv = write_toy_csv(tmp_path / "toy.csv")
    config = (
        f"model={tiny_bert} dataset=csv:{csv} partitioner=iid num-server-rounds=3 local-steps=2"
        " lora-rank=4 lora-alpha=8 run-name=fault"
    )
    killed: list[int] = []

    def kill_a_node_once_round_zero_is_out(line: str, proc: subprocess.Popen) -> None:
        if line.startswith("round   0/3") and not killed:
            nodes = [
                p for p in psutil.Process(proc.pid).children(recursive=True)
                if "flower-supernode" in " ".join(p.cmdline())
            ]  # fmt: skip
            killed.append(nodes[1].pid)
            nodes[1].kill()

    code, output, started = _run_deploy(
        ["--nodes", "3", "--output-dir", str(tmp_path), "--run-config", config],
        kill_a_node_once_round_zero_is_out,
    )
    assert code == 0, output
    assert killed and "supernode-2 was killed by signal 9" in output
    rows, summary = check_run_directory(tmp_path / "fault", 3)
    assert [(r["clients"], r["failures"]) for r in rows[1:]] == [(2, 1), (2, 0), (2, 0)]
    [(node, reason)] = rows[1]["failed_nodes"]
    assert "Node Unavailable" in reason and node > 1  # the dead node's id, not the SuperLink's
    assert summary["failures_total"] == 1
    assert not _still_running(started)
