"""Benchmark: Flower + Ray overhead of a FeDeRA simulation, and bytes per round FeDeRA vs fft.

Runs one real simulation per method through `federa simulate`'s code path and prints, from the
run directories: SVD init seconds, mean round wall time, mean sum of client compute time, their
ratio, and bytes per round each way. Figures are printed, not asserted.

    .venv/bin/python simulation/bench_overhead.py [--num-clients 4] [--rounds 3] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from statistics import mean

from federa_app.records import read_metrics
from federa_app.simulate import simulate


def bench(method: str, num_clients: int, rounds: int, out: Path, extra: dict) -> dict:
    """Run one simulation and reduce its run directory to the benchmark's figures."""
    overrides = {"method": method, "num-server-rounds": rounds, "run-name": method, **extra}
    run_dir = simulate(num_clients, overrides, output_dir=out, log=lambda _: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)[1:]  # round 0 is the initial evaluation only
    later = rows[1:] or rows  # round 1 also pays Ray's start-up and the actors' first imports
    return {
        "method": method,
        "svd_seconds": summary["svd_seconds"],
        "round1_seconds": rows[0]["round_seconds"],
        "round_seconds": mean(r["round_seconds"] for r in later),
        "client_seconds_sum": mean(r["client_seconds_sum"] for r in later),
        "client_seconds_max": mean(r["client_seconds_max"] for r in later),
        "bytes_up": mean(r["bytes_up"] for r in later),
        "bytes_down": mean(r["bytes_down"] for r in later),
        "final_accuracy": summary["final_accuracy"],
        "trainable_params": summary["trainable_params"],
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
    header = (
        f"{'method':<8} {'SVD s':>6} {'round1 s':>9} {'round s':>8} {'client sum s':>13} "
        f"{'round/client-sum':>17} {'MB up/round':>12} {'MB down/round':>14} {'accuracy':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r['method']:<8} {r['svd_seconds']:>6.2f} {r['round1_seconds']:>9.1f} "
            f"{r['round_seconds']:>8.1f} {r['client_seconds_sum']:>13.1f} "
            f"{r['round_seconds'] / r['client_seconds_sum']:>17.2f} {r['bytes_up'] / 1e6:>12.3f} "
            f"{r['bytes_down'] / 1e6:>14.3f} {r['final_accuracy']:>9.4f}"
        )
    by_method = {r["method"]: r for r in results}
    if {"federa", "fft"} <= set(by_method):
        ratio = by_method["fft"]["bytes_up"] / by_method["federa"]["bytes_up"]
        print(f"fft sends {ratio:.0f}x the bytes of federa per round (uplink)")
    print(
        "round s excludes round 1; round/client-sum < 1 means clients ran in parallel "
        "(Ray runs floor(CPUs / client-resources-num-cpus) at once)"
    )


if __name__ == "__main__":
    main()
