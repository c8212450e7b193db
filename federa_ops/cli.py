"""The `federa` command: fetch assets, run a simulation, predict with a saved run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from federa_app.errors import FederaError

RESUME_HELP = (
    "continue this run directory after its last checkpointed round, with its own run config "
    "(--run-config may change num-server-rounds and other keys that do not alter the training)"
)


def _fetch(args: argparse.Namespace) -> None:
    from federa_app.data import assets

    assets.fetch(args.names or None)


def _overrides(args: argparse.Namespace) -> dict:
    """--run-config pairs, plus resume-from for --resume."""
    from federa_app.config import parse_overrides

    overrides = parse_overrides(" ".join(args.run_config))
    if args.resume:
        overrides["resume-from"] = str(Path(args.resume).resolve())
    return overrides


def _node_count(args: argparse.Namespace, given: int | None, default: int) -> int:
    """The node count asked for, else the resumed run's, else the default."""
    from federa_ops.simulate import resume_nodes

    if given is not None:
        return given
    return resume_nodes(args.resume) if args.resume else default


def _simulate(args: argparse.Namespace) -> None:
    from federa_ops.simulate import simulate

    run_dir = simulate(
        num_clients=_node_count(args, args.num_clients, 10),
        overrides=_overrides(args),
        output_dir=args.output_dir,
        app_dir=args.app,
        cpus_per_client=args.cpus_per_client,
    )
    _show(run_dir)


def _deploy(args: argparse.Namespace) -> None:
    from federa_ops.deploy import deploy_local

    run_dir = deploy_local(
        nodes=_node_count(args, args.nodes, 3),
        overrides=_overrides(args),
        output_dir=args.output_dir,
        app_dir=args.app,
        tls=args.tls,
        isolation=args.isolation,
        node_data=args.node_data,
        warm_workers=args.warm_workers,
    )
    _show(run_dir)


def _show(run_dir: Path) -> None:
    from federa_ops.simulate import result_table

    print(result_table(run_dir))
    print(f"run directory: {run_dir}")


def _certs(args: argparse.Namespace) -> None:
    from federa_ops.certs import DEFAULT_SANS, make_credentials

    sans = tuple(args.san) or DEFAULT_SANS
    creds = make_credentials(args.directory, args.nodes, sans, args.days, args.overwrite)
    print(f"CA certificate          {creds.ca_cert}  (give to every SuperNode and flwr user)")
    print(f"SuperLink certificate   {creds.server_cert}, key {creds.server_key}")
    print(f"  valid for             {', '.join(sans)}")
    for index, key in enumerate(creds.node_keys, 1):
        print(f"supernode-{index} key pair   {key}, {creds.node_public_key(index)}")
    print("keep ca.key, server.key and supernode-*.key secret; register each node with")
    print("  flwr supernode register supernode-N.pub <connection>")


def _worker(args: argparse.Namespace) -> None:
    from federa_app.federation.warm_worker import run_worker

    run_worker(args.socket, args.threads)


def _compare(args: argparse.Namespace) -> None:
    from federa_ops.simulate import check_cpus_per_client, simulate
    from simulation.compare import expand, is_finished, load_grid, run_grid
    from simulation.report import write_report

    grid = load_grid(args.grid)
    if args.cpus_per_client is not None:  # this machine's actor size; cells keep their names
        check_cpus_per_client(args.cpus_per_client)
        grid = dataclasses.replace(grid, cpus_per_client=args.cpus_per_client)
    out_dir = Path(args.output_dir or Path("results") / grid.name).resolve()
    if args.dry_run:
        for cell in expand(grid):
            print(f"{'finished' if is_finished(out_dir, cell) else 'to run  '}  {cell.name}")
        return
    failures = [] if args.report_only else run_grid(grid, out_dir, simulate)
    print(write_report(grid, out_dir, args.note))
    print(f"results: {out_dir / 'results.md'}, {out_dir / 'results.csv'} and plots")
    if failures:
        from federa_app.errors import RunFailed

        names = ", ".join(cell.name for cell, _ in failures)
        raise RunFailed(f"{len(failures)} cell(s) failed: {names} (re-run to retry them)")


def _quiet_transformers() -> None:
    """Hide transformers' load report (the new head is expected to be missing)."""
    from transformers.utils import logging

    logging.set_verbosity_error()


def _methods(args: argparse.Namespace) -> None:
    _quiet_transformers()
    from federa_app.config import parse_overrides, parse_run_config
    from federa_app.method.models import check_model_fits, method_table, resolve_model

    cfg = parse_run_config(parse_overrides(" ".join(args.run_config)))
    model_ref = resolve_model(cfg.model)
    labels = tuple(f"label-{i}" for i in range(args.num_labels))
    check_model_fits(cfg, model_ref, len(labels))
    rows = method_table(cfg, model_ref, labels)
    print(
        f"{cfg.model}, {args.num_labels} labels, lora-rank {cfg.lora_rank}, adapter-size "
        f"{cfg.adapter_size}; bytes per client per round, each way"
    )
    print(f"{'method':<11} {'trainable':>11} {'of model':>9} {'MB/round':>9} {'MB once':>8}")
    for r in rows:
        print(
            f"{r['method']:<11} {r['trainable_params']:>11,} {r['fraction']:>9.3%} "
            f"{r['bytes_per_round'] / 1e6:>9.3f} {r['bytes_once'] / 1e6:>8.3f}"
        )
    print("MB once: the SVD factors an SVD-initialised method sends each node in its first round")


def _predict(args: argparse.Namespace) -> None:
    _quiet_transformers()
    import torch

    from federa_app.method.models import load_saved_model, load_tokenizer
    from federa_app.records.run_dir import ADAPTER_DIR, CONFIG_FILE

    run_dir = Path(args.run_dir)
    config_file = run_dir / CONFIG_FILE
    if not (run_dir / ADAPTER_DIR).is_dir() or not config_file.is_file():
        raise FederaError(f"{run_dir} is not a finished run directory (no adapter/ or config.json)")
    config = json.loads(config_file.read_text())
    labels = tuple(config["labels"])
    model = load_saved_model(run_dir / ADAPTER_DIR, config["model-path"], labels)
    tokenizer = load_tokenizer(config["model-path"])
    batch = tokenizer(
        args.texts, truncation=True, max_length=config["max-length"], padding=True,
        return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        probs = model(**batch).logits.softmax(-1)
    for text, p in zip(args.texts, probs, strict=True):
        best = int(p.argmax())
        print(f"{labels[best]}\t{p[best]:.4f}\t{text}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `federa` command."""
    parser = argparse.ArgumentParser(prog="federa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch", help="download and verify the offline model and datasets")
    fetch.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    fetch.set_defaults(func=_fetch)

    sim = sub.add_parser("simulate", help="run a Ray-backed Flower simulation")
    sim.add_argument(
        "--num-clients", type=int, default=None,
        help="simulated SuperNodes (10; with --resume the run's own count)",
    )  # fmt: skip
    sim.add_argument(
        "--run-config", action="append", default=[], metavar='"k=v ..."',
        help="run-config overrides, as for `flwr run` (strings may be unquoted)",
    )  # fmt: skip
    sim.add_argument("--output-dir", default="runs", help="parent of the run directory (runs)")
    sim.add_argument("--cpus-per-client", type=int, default=1, help="CPUs per client (1)")
    sim.add_argument("--app", type=Path, default=None, help="Flower app directory (this one)")
    sim.add_argument("--resume", metavar="RUN_DIR", help=RESUME_HELP)
    sim.set_defaults(func=_simulate)

    dep = sub.add_parser("deploy", help="run on a real SuperLink + SuperNodes (loopback)")
    dep.add_argument("where", choices=["local"], help="local: every process on this machine")
    dep.add_argument(
        "--nodes", type=int, default=None,
        help="SuperNodes to start (3; with --resume the run's own count)",
    )  # fmt: skip
    dep.add_argument("--tls", action="store_true", help="TLS and node authentication")
    dep.add_argument(
        "--isolation", default="subprocess", help="subprocess (default) or process (SuperExecs)"
    )
    dep.add_argument(
        "--node-data", action="append", default=[], metavar="SPEC",
        help="a node's own data (csv:PATH, json:PATH or a dataset name), once per node",
    )  # fmt: skip
    dep.add_argument("--run-config", action="append", default=[], metavar='"k=v ..."')
    dep.add_argument("--output-dir", default="runs", help="parent of the run directory (runs)")
    dep.add_argument("--app", type=Path, default=None, help="Flower app directory (this one)")
    dep.add_argument("--resume", metavar="RUN_DIR", help=RESUME_HELP)
    dep.add_argument(
        "--warm-workers", action="store_true",
        help="a warm worker next to each SuperNode (`federa worker`): no per-message imports",
    )  # fmt: skip
    dep.set_defaults(func=_deploy)

    certs = sub.add_parser("certs", help="make a CA, SuperLink certificate and node key pairs")
    certs.add_argument("directory", help="where to write them (created)")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs (2)")
    certs.add_argument(
        "--san", action="append", default=[], metavar="HOST",
        help="the SuperLink's IP or DNS name, repeatable (localhost, 127.0.0.1, ::1)",
    )  # fmt: skip
    certs.add_argument("--days", type=int, default=365, help="validity in days (365)")
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")
    certs.set_defaults(func=_certs)

    work = sub.add_parser(
        "worker",
        help="a node's warm worker: keeps torch and the model loaded between train messages",
        description="Serve one SuperNode's train messages on a Unix socket, with the training "
        "libraries loaded once; start the SuperNode with --node-config "
        "'warm-worker=\"PATH\"'. Stops on SIGINT/SIGTERM, removing the socket.",
    )
    work.add_argument(
        "--socket", required=True, metavar="PATH",
        help="the socket to create (mode 0600; its directory must be private to this user)",
    )  # fmt: skip
    work.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="torch threads (default: OMP_NUM_THREADS, else all CPUs; num-threads in the run "
        "config wins, as in the ClientApp)",
    )  # fmt: skip
    work.set_defaults(func=_worker)

    comp = sub.add_parser("compare", help="run a grid of simulations; tables and plots")
    comp.add_argument("grid", help="preset (smoke, quick, sweep, paper) or a TOML grid file")
    comp.add_argument("--output-dir", default=None, help="grid directory (results/GRID-NAME)")
    comp.add_argument(
        "--cpus-per-client", type=int, default=None,
        help="CPUs each simulated client claims (default: the grid's cpus-per-client, else 1)",
    )  # fmt: skip
    comp.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    comp.add_argument("--report-only", action="store_true", help="tables from finished cells")
    comp.add_argument("--note", default="", help="a line for results.md (command, machine)")
    comp.set_defaults(func=_compare)

    methods = sub.add_parser("methods", help="trainable parameters and bytes of every method")
    methods.add_argument("--run-config", action="append", default=[], metavar='"k=v ..."')
    methods.add_argument("--num-labels", type=int, default=2, help="classes of the task head (2)")
    methods.set_defaults(func=_methods)

    pred = sub.add_parser("predict", help="classify texts with a finished run's saved model")
    pred.add_argument("run_dir", help="a run directory written by a finished run")
    pred.add_argument("texts", nargs="+", help="one or more texts")
    pred.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors are one line on stderr and exit code 2; failed runs exit 1."""
    args = build_parser().parse_args(argv)
    # `kill PID` should stop a run as cleanly as Ctrl-C: unwinding runs every cleanup block.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        args.func(args)
    except FederaError as exc:
        from federa_app.errors import RunFailed

        print(f"federa: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RunFailed) else 2
    except KeyboardInterrupt:
        print("federa: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
