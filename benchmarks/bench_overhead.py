"""Benchmark: Flower + Ray overhead of a FeDeRA simulation, and bytes per round FeDeRA vs fft.

Runs one real simulation per method through `federa simulate`'s code path and prints, from the
run directories: SVD init seconds, mean round wall time, mean sum of client compute time, their
ratio, and bytes per round each way. Figures are printed, not asserted.

    .venv/bin/python benchmarks/bench_overhead.py [--num-clients 4] [--rounds 3] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from statistics import mean

from federa_app.records.run_dir import read_metrics
from federa_ops.simulate import simulate


def bench(method: str, num_clients: int, rounds: int, out: Path, extra: dict) -> dict:
    """Run one simulation and reduce its run directory to the benchmark's figures."""
    overrides = {"method": method, "num-server-rounds": rounds, "run-name": method, **extra}
    run_dir = simulate(num_clients, overrides, output_dir=out, log=lambda _: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)[1:]  # round 0 is the initial evaluation only
    later = rows[1:] or rows  # round 1 also pays Ray's start-up and the actors' first imports
    slots = min(num_clients, os.cpu_count() or 1)  # one CPU per client: Ray runs this many at once
    round_s = mean(r["round_seconds"] for r in later)
    eval_s = mean(r["eval_seconds"] for r in later)
    client_sum_s = mean(r["client_seconds_sum"] for r in later)
    return {
        "method": method,
        "svd_seconds": summary["svd_seconds"],
        "round1_seconds": rows[0]["round_seconds"],
        "round_seconds": round_s,
        "eval_seconds": eval_s,
        "client_seconds_sum": client_sum_s,
        "overhead_seconds": round_s - eval_s - client_sum_s / slots,
        "overhead_ratio": (round_s - eval_s) / (client_sum_s / slots),
        "bytes_up": mean(r["bytes_up"] for r in later),
        "bytes_down": mean(r["bytes_down"] for r in later),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["federa", "fft"])
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
    args = parser.parse_args()
    extra = {"dirichlet-alpha": args.dirichlet_alpha}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.num_clients} clients x {args.rounds} rounds, minilm-l6 on rotten-tomatoes"
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(m, args.num_clients, args.rounds, Path(tmp), extra) for m in args.methods]
    print(
        f"{'method':<7} {'SVD s':>6} {'round1 s':>8} {'round s':>7} {'eval s':>6} "
        f"{'client sum s':>12} {'overhead s':>10} {'ratio':>5} {'MB up':>8} {'MB down':>8}"
    )
    for r in results:
        print(
            f"{r['method']:<7} {r['svd_seconds']:>6.2f} {r['round1_seconds']:>8.1f} "
            f"{r['round_seconds']:>7.1f} {r['eval_seconds']:>6.1f} "
            f"{r['client_seconds_sum']:>12.1f} "
            f"{r['overhead_seconds']:>10.1f} {r['overhead_ratio']:>5.2f} "
            f"{r['bytes_up'] / 1e6:>8.3f} {r['bytes_down'] / 1e6:>8.3f}"
        )
    by_method = {r["method"]: r for r in results}
    if {"federa", "fft"} <= set(by_method):
        ratio = by_method["fft"]["bytes_up"] / by_method["federa"]["bytes_up"]
        print(f"fft sends {ratio:.0f}x the bytes of federa per round (uplink)")
    print(
        "per round, rounds 2+ (round 1 also pays Ray's start-up); eval s = server-side test-set "
        "evaluation; overhead s = round - eval - client sum / parallel clients (Flower + Ray: "
        "messaging, serialisation, aggregation, actor scheduling); ratio = (round - eval) / "
        "(client sum / parallel clients). MB per round, all clients together."
    )


if __name__ == "__main__":
    main()
