"""Benchmark: simulation vs loopback deployment, and what one ClientApp message costs.

1. The same FeDeRA and fft runs (real minilm-l6 on rotten-tomatoes) through `federa simulate`
   (Ray) and `federa deploy local` (SuperLink + SuperNodes): per-round wall time of each, the
   server's evaluation, the slowest client's own work, and what is left (deployment overhead).
2. One train message handled the way a SuperNode handles it in Flower 1.42: a fresh Python
   process imports the ClientApp and runs it once. Printed: interpreter start, imports (per
   package), and the phases of the handler (data, model, training, reply). Then the same with a
   warm worker (`federa worker`, federa_app/federation/warm_worker.py), started once: every message
   is again a fresh ClientApp process, which imports only Flower and forwards the message to the
   worker. Printed: its imports, the exchange with the worker and the worker's own phases.
Figures are printed, not asserted.

    .venv/bin/python benchmarks/bench_deploy.py [--nodes 3] [--rounds 3] [--methods federa fft]
    .venv/bin/python benchmarks/bench_deploy.py --skip-runs      # the per-message part only
    .venv/bin/python benchmarks/bench_deploy.py --skip-runs --methods federa --warm-messages 6
    sudo .venv/bin/python benchmarks/bench_deploy.py --netns     # real links: time to target

3. With --netns (root and iproute2 needed): every SuperNode in its own network namespace behind
   a veth pair shaped to --mbit (tc tbf, both directions); federa and fft deployed over those
   links until --target accuracy: the real wall time to target, transfers included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

ROOT = Path(__file__).resolve().parent.parent
# Handler phases: (label, module, function). The functions are wrapped with timers where
# handle_train looks them up (cProfile would inflate the Python-heavy data code several-fold).
PHASES = (
    ("labels + node data", "federa_app.data.loading", "node_train_data"),
    ("model (load + build)", "federa_app.federation.client", "build_model"),
    ("received tensors in", "federa_app.federation.client", "load_trainable_state"),
    ("tokenizer", "federa_app.federation.client", "load_tokenizer"),
    ("local training", "federa_app.federation.client", "train_locally"),
    ("reply tensors out", "federa_app.federation.client", "trainable_state"),
)
# The packages the ClientApp imports, heaviest first; flwr_datasets is left to `client_app`
# (it is imported there only if the node has to compute a partition). The last step is what
# the `flwr-clientapp` command imports before it runs anything (Flower's own start; it does not
# cover its FAB unpacking and its HTTP exchanges with the SuperNode, the same on both paths).
FLWR_STEPS = (("flwr", "flwr"), ("flwr-clientapp command", "flwr.supernode.cli.flwr_clientapp"))
IMPORT_STEPS = (*((p, p) for p in ("torch", "transformers", "peft", "datasets")), *FLWR_STEPS)
HEAVY = ("torch", "transformers", "peft", "datasets", "flwr_datasets")


def run_pair(method: str, nodes: int, rounds: int, out: Path, extra: dict) -> dict:
    """One simulation and one loopback deployment of the same run; per-round figures of each."""
    from federa_app.records.run_dir import read_metrics
    from federa_ops.deploy import deploy_local
    from federa_ops.simulate import simulate

    figures = {"method": method}
    for engine in ("simulation", "deployment"):
        overrides = {"method": method, "num-server-rounds": rounds, **extra}
        overrides["run-name"] = f"{method}-{engine}"
        started = time.perf_counter()
        if engine == "simulation":
            run_dir = simulate(nodes, overrides, output_dir=out, log=lambda _: None)
        else:
            run_dir = deploy_local(nodes, overrides, output_dir=out, log=lambda _: None)
        total = time.perf_counter() - started
        rows = read_metrics(run_dir)[1:]
        later = rows[1:] or rows  # round 1 also pays Ray's start / the factors' first shipping
        figures[engine] = {
            "command_seconds": total,
            "round1_seconds": rows[0]["round_seconds"],
            "round_seconds": mean(r["round_seconds"] for r in later),
            "eval_seconds": mean(r["eval_seconds"] for r in later),
            "client_seconds_max": mean(r["client_seconds_max"] for r in later),
            "final_accuracy": rows[-1]["accuracy"],
        }
    return figures


def timed_imports(steps: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """Import each module in turn, then the ClientApp as flwr-clientapp loads it from the app
    bundle; each step's seconds are what it adds to the ones before."""
    timings: dict[str, float] = {}
    for label, module in steps:
        t = time.perf_counter()
        __import__(module)
        timings[f"import {label}"] = time.perf_counter() - t
    sys.path.insert(0, str(ROOT))
    t = time.perf_counter()
    import client_app  # noqa: F401

    timings["import client_app (federa_app)"] = time.perf_counter() - t
    return timings


def message_child(args: argparse.Namespace) -> None:
    """In a fresh process: import the ClientApp, handle one train message, print JSON timings."""
    started = time.perf_counter()
    timings = timed_imports(IMPORT_STEPS)
    from federa_app.federation.client import handle_train

    timings["imports total"] = time.perf_counter() - started

    message, context = _message_and_context(json.loads(Path(args.message_file).read_text()))
    for label, module, function in PHASES:
        if hasattr(sys.modules[module], function):  # older versions of the app lack some
            _time_calls(sys.modules[module], function, label, timings)
    t = time.perf_counter()
    handle_train(message, context)
    timings["handler total"] = time.perf_counter() - t
    timings["flwr_datasets loaded (1 = yes)"] = float("flwr_datasets" in sys.modules)
    print(json.dumps(timings))


def _message_and_context(saved: dict, worker_socket: str = ""):  # noqa: ANN202 - flwr types
    """The saved train message as the SuperNode hands it to a ClientApp, and the node context.

    The tensors are read as numpy arrays (safetensors.numpy), so that building the message does
    not import torch: the warm path's ClientApp process must not need it.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.numpy import load_file

    from federa_app.federation.wire import INIT_FACTORS_KEY

    def record(path: str) -> ArrayRecord:
        return ArrayRecord({name: Array(array) for name, array in load_file(path).items()})

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, SUPERLINK_NODE_ID, 1
    config = ConfigRecord({"server-round": 1, **saved["config"]})
    content = {"arrays": record(saved["arrays"]), "config": config}
    if saved.get("factors"):
        content[INIT_FACTORS_KEY] = record(saved["factors"])
    message = Message(RecordDict(content), dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperNode delivers it
    node_config = dict(saved["node_config"])
    if worker_socket:
        node_config["warm-worker"] = worker_socket
    return message, Context(1, 7, node_config, RecordDict(), saved["run_config"])


def warm_child(args: argparse.Namespace) -> None:
    """In a fresh process: the ClientApp forwards one train message to the warm worker; print
    JSON timings (this process's imports, the exchange, the worker's own figures)."""
    started = time.perf_counter()
    timings = timed_imports(FLWR_STEPS)
    import client_app
    from federa_app.federation import warm_worker

    timings["imports total"] = time.perf_counter() - started
    saved = json.loads(Path(args.warm_child).read_text())
    message, context = _message_and_context(saved, args.worker_socket)
    t = time.perf_counter()
    client_app.app(message, context)
    timings["handler total (forwarded)"] = time.perf_counter() - t
    if "worker handler" not in warm_worker.last_exchange:
        raise SystemExit("bench_deploy: the warm worker did not handle the message (see above)")
    timings.update(warm_worker.last_exchange)
    timings["torch etc. imported (1 = yes)"] = float(any(m in sys.modules for m in HEAVY))
    print(json.dumps(timings))


def worker_child(args: argparse.Namespace) -> None:
    """The warm worker, with the handler's phases timed per message (as in message_child)."""
    sys.path.insert(0, str(ROOT))  # the same federa_app as the ClientApp processes
    from federa_app.federation import client
    from federa_app.federation.warm_worker import run_worker

    phases: dict[str, float] = {}
    for label, module, function in PHASES:
        if hasattr(sys.modules[module], function):
            _time_calls(sys.modules[module], function, label, phases)

    def handler(msg, context):  # noqa: ANN001, ANN202 - flwr types
        for label in phases:
            phases[label] = 0.0
        return client.handle_train(msg, context)

    run_worker(args.worker_child, threads=1, handler=handler, handler_timings=phases)


def _time_calls(module: object, name: str, label: str, timings: dict[str, float]) -> None:
    """Replace module.name with a wrapper that adds each call's seconds to timings[label]."""
    original = getattr(module, name)
    timings[label] = 0.0

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timings[label] += time.perf_counter() - t

    setattr(module, name, timed)


def profile_message(
    method: str, node_data: str, extra: dict, workdir: Path, messages: int = 4
) -> tuple[dict, tuple[float, dict]]:
    """Prepare the server's first message for `method`, then time fresh processes handling it:
    in the process (as today), then forwarded to a warm worker; `messages` of each."""
    from safetensors.torch import save_file

    from federa_app.config import parse_run_config
    from federa_app.data import loading
    from federa_app.method.models import (
        build_model,
        initial_factors,
        resolve_model,
        trainable_state,
    )
    from federa_ops.simulate import app_defaults, default_app_dir

    run_config = {**app_defaults(default_app_dir()), **extra, "method": method}
    cfg = parse_run_config(run_config)
    model_ref = resolve_model(cfg.model)
    labels = loading.load_labelled(cfg.dataset)[1]
    factors = initial_factors(cfg, model_ref, labels) if cfg.uses_svd_init else None
    model = build_model(cfg, model_ref, labels, factors)
    save_file(trainable_state(model), workdir / f"{method}-arrays.safetensors")
    if factors is not None:
        save_file(factors, workdir / f"{method}-factors.safetensors")
    node_config = {"partition-id": 0, "num-partitions": 3}
    if node_data:
        node_config["data"] = node_data
    message_file = workdir / f"{method}-message.json"
    message_file.write_text(
        json.dumps(
            {
                "arrays": str(workdir / f"{method}-arrays.safetensors"),
                "factors": str(workdir / f"{method}-factors.safetensors") if factors else "",
                "config": {loading.LABELS_KEY: list(labels)},
                "node_config": node_config,
                "run_config": run_config,
            }
        )
    )
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "FEDERA_NODE_CACHE": str(workdir / f"{method}-node-cache"),  # cold for the first message
    }  # fmt: skip
    # The worker starts first; then fresh and warm messages alternate, so that both paths see
    # the same machine load (a busy machine's timings drift by seconds within minutes).
    socket_path = workdir / "workers" / f"{method}.sock"
    worker, ready = _start_worker(socket_path, workdir, method, env)
    fresh, warm = [], []
    try:
        for _ in range(messages):
            fresh.append(_sample(["--message-child", str(message_file)], env, "handler total"))
            warm_args = ["--warm-child", str(message_file), "--worker-socket", str(socket_path)]
            warm.append(_sample(warm_args, env, "handler total (forwarded)"))
    finally:
        worker.terminate()  # SIGTERM: the worker stops cleanly, removing its socket
        worker.wait(60)
    return _first_and_later(fresh), (ready, _first_and_later(warm))


def _start_worker(
    socket_path: Path, workdir: Path, method: str, env: dict
) -> tuple[subprocess.Popen, float]:
    """A warm worker (its own, cold node cache); the seconds until it printed its ready line."""
    worker_env = {**env, "FEDERA_NODE_CACHE": str(workdir / f"{method}-warm-node-cache")}
    log_file = workdir / f"{method}-worker.log"
    started = time.perf_counter()
    with open(log_file, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--worker-child", str(socket_path)],
            stdout=log, stderr=subprocess.STDOUT, env=worker_env, cwd=workdir,
        )  # fmt: skip
    while "federa worker: ready" not in log_file.read_text():
        if worker.poll() is not None or time.perf_counter() - started > 600:
            worker.kill()
            raise SystemExit(
                f"bench_deploy: the warm worker did not start:\n{log_file.read_text()[-2000:]}"
            )
        time.sleep(0.1)
    return worker, time.perf_counter() - started


def _sample(child_args: list[str], env: dict, handler_key: str) -> dict[str, float]:
    """One message in a fresh process: its JSON timings, the process wall time and the rest."""
    t = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, *child_args], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t
    if result.returncode != 0:
        raise SystemExit(f"bench_deploy: {child_args[0]} failed:\n{result.stderr[-3000:]}")
    timings = json.loads(result.stdout.strip().splitlines()[-1])
    prefix = "worker " if handler_key != "handler total" else ""  # the handler ran there
    handler = timings[f"{prefix}handler" if prefix else handler_key]
    phases = [f"{prefix}{label}" for label, _, _ in PHASES if f"{prefix}{label}" in timings]
    rest = handler - sum(timings[key] for key in phases)  # mostly the rows' disk-cache load
    items = list(timings.items())
    at = max(i for i, (key, _) in enumerate(items) if key in phases) + 1 if phases else len(items)
    timings = dict([*items[:at], (f"{prefix}rest (cached rows etc.)", rest), *items[at:]])
    timings["process wall"] = wall
    timings["interpreter + exit"] = wall - timings["imports total"] - timings[handler_key]
    return timings


def _first_and_later(samples: list[dict]) -> dict[str, tuple[float, float]]:
    """{figure: (the first message's, the median of the later ones')}."""
    first, later = samples[0], samples[1:] or samples
    return {key: (first[key], median(s[key] for s in later)) for key in first}


def namespaces_possible() -> str:
    """Why network namespaces cannot be used here ("" when they can): root, ip and tc needed."""
    import shutil

    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"needs {' and '.join(missing)} (iproute2)" if missing else ""


def _sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def make_namespaces(nodes: int, mbit: float) -> list:
    """One network namespace per node behind its own veth pair, both directions shaped to
    `mbit` with tc's token bucket filter; returns the NodeNetwork of each node."""
    from federa_ops.deploy import NodeNetwork

    networks = []
    for i in range(1, nodes + 1):
        ns, host_if, node_if = f"federa-n{i}", f"fdr{i}h", f"fdr{i}n"
        host_ip, node_ip = f"10.231.{i}.1", f"10.231.{i}.2"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
        _sh("ip", "link", "set", node_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        for command in (
            ("ip", "addr", "add", f"{node_ip}/24", "dev", node_if),
            ("ip", "link", "set", node_if, "up"),
            ("ip", "link", "set", "lo", "up"),
        ):
            _sh("ip", "netns", "exec", ns, *command)
        shape = ("tc", "qdisc", "add", "dev")
        tbf = ("root", "tbf", "rate", f"{mbit}mbit", "burst", "32kbit", "latency", "400ms")
        _sh(*shape, host_if, *tbf)  # server -> node (downlink)
        _sh("ip", "netns", "exec", ns, *shape, node_if, *tbf)  # node -> server (uplink)
        networks.append(NodeNetwork(("ip", "netns", "exec", ns), host_ip))
    return networks


def remove_namespaces(nodes: int) -> None:
    """Delete what make_namespaces made (the veth pair goes with its namespace)."""
    for i in range(1, nodes + 1):
        subprocess.run(["ip", "netns", "del", f"federa-n{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"fdr{i}h"], capture_output=True)


def run_over_link(args: argparse.Namespace, extra: dict, out: Path) -> None:
    """federa vs fft deployed with every SuperNode behind a rate-limited link: real time to
    the target accuracy (the server's wall clock, link transfers included)."""
    from federa_ops.deploy import deploy_local
    from federa_ops.runtime import summary

    why_not = namespaces_possible()
    if why_not:
        raise SystemExit(f"bench_deploy --netns: {why_not}")
    print(
        f"\n{args.nodes} SuperNodes in network namespaces, each behind a {args.mbit} Mbit/s "
        f"link (tc tbf, both directions); target accuracy {args.target}, at most "
        f"{args.netns_rounds} rounds"
    )
    print(f"{'method':<7} {'rounds':>6} {'to target s':>11} {'MB to target':>12} {'final':>6} "
          f"{'round s':>8}")  # fmt: skip
    remove_namespaces(args.nodes)  # leftovers of an interrupted run
    try:
        networks = make_namespaces(args.nodes, args.mbit)
        for method in args.methods:
            overrides = {
                **extra, "method": method, "num-server-rounds": args.netns_rounds,
                "target-accuracy": args.target, "run-name": f"{method}-netns",
            }  # fmt: skip
            run_dir = deploy_local(
                args.nodes, overrides, output_dir=out, log=lambda _: None, networks=networks
            )
            s = summary(run_dir)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()][1:]
            reached = s["rounds_to_target"] is not None
            to_target = f"{s['wall_seconds_to_target']:.0f}" if reached else "not reached"
            megabytes = (
                f"{(s['bytes_up_to_target'] + s['bytes_down_to_target']) / 1e6:.1f}"
                if reached else "-"
            )  # fmt: skip
            print(
                f"{method:<7} {s['rounds_to_target'] if reached else '-':>6} {to_target:>11} "
                f"{megabytes:>12} {s['final_accuracy']:>6.3f} "
                f"{mean(r['round_seconds'] for r in rows):>8.1f}"
            )
    finally:
        remove_namespaces(args.nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["federa", "fft"])
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--node-data", default="", help="node-config data for the message part")
    parser.add_argument("--skip-runs", action="store_true", help="only the per-message part")
    parser.add_argument(
        "--netns", action="store_true",
        help="only: SuperNodes in network namespaces behind rate-limited links (root, iproute2)",
    )  # fmt: skip
    parser.add_argument("--mbit", type=float, default=10.0, help="link rate for --netns (10)")
    parser.add_argument("--target", type=float, default=0.7, help="target accuracy (--netns)")
    parser.add_argument("--netns-rounds", type=int, default=6, help="max rounds (--netns)")
    parser.add_argument(
        "--warm-messages", type=int, default=4,
        help="messages per path in the per-message part (4: the first, then the median of 3)",
    )  # fmt: skip
    parser.add_argument("--message-child", help=argparse.SUPPRESS)
    parser.add_argument("--warm-child", help=argparse.SUPPRESS)
    parser.add_argument("--worker-socket", help=argparse.SUPPRESS)
    parser.add_argument("--worker-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.message_child:
        args.message_file = args.message_child
        message_child(args)
        return
    if args.warm_child:
        warm_child(args)
        return
    if args.worker_child:
        worker_child(args)
        return
    extra = {"local-steps": args.local_steps, "eval-max-examples": 200, "dirichlet-alpha": 1.0}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"minilm-l6 on rotten-tomatoes, local-steps {args.local_steps}, 200 test examples"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.netns:
            run_over_link(args, extra, Path(tmp) / "runs")
            return
        print(
            "\none train message in a fresh process, as Flower 1.42 starts one per message "
            "(1 thread; seconds):"
        )
        later_note = f"(later: median of {max(args.warm_messages - 1, 1)})"
        for method in args.methods:
            timings, (ready, warm) = profile_message(
                method, args.node_data, extra, Path(tmp), max(args.warm_messages, 2)
            )
            print(f"  {method:<34} {'first':>7} {'later':>7}  {later_note}")
            for key, (first, later) in timings.items():
                print(f"    {key:<32} {first:7.2f} {later:7.2f}")
            print(
                f"  {method}, warm worker (ready {ready:.1f} s after its start), each message "
                "again a fresh ClientApp process forwarding to it:"
            )
            for key, (first, later) in warm.items():
                print(f"    {key:<32} {first:7.2f} {later:7.2f}")
            fresh_wall, warm_wall = timings["process wall"], warm["process wall"]
            print(
                f"  {method}: process wall per message, fresh {fresh_wall[0]:.2f} / "
                f"{fresh_wall[1]:.2f} s, warm {warm_wall[0]:.2f} / {warm_wall[1]:.2f} s "
                "(first / later)"
            )
        if args.skip_runs:
            return
        print(f"\n{args.nodes} nodes x {args.rounds} rounds; means over rounds 2..{args.rounds}")
        header = (
            f"{'method':<7} {'engine':<11} {'round s':>8} {'round 1 s':>9} {'eval s':>7} "
            f"{'client max s':>12} {'other s':>8} {'command s':>9} {'accuracy':>8}"
        )
        print(header)
        for method in args.methods:
            figures = run_pair(method, args.nodes, args.rounds, Path(tmp) / "runs", extra)
            for engine in ("simulation", "deployment"):
                f = figures[engine]
                other = f["round_seconds"] - f["eval_seconds"] - f["client_seconds_max"]
                print(
                    f"{method:<7} {engine:<11} {f['round_seconds']:>8.1f} "
                    f"{f['round1_seconds']:>9.1f} {f['eval_seconds']:>7.1f} "
                    f"{f['client_seconds_max']:>12.1f} {other:>8.1f} "
                    f"{f['command_seconds']:>9.0f} {f['final_accuracy']:>8.4f}"
                )
            overhead = (
                figures["deployment"]["round_seconds"] - figures["simulation"]["round_seconds"]
            )
            print(f"{method:<7} deployment overhead per round: {overhead:+.1f} s")


if __name__ == "__main__":
    main()
