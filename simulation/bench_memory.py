"""Benchmark: a client's memory (RSS) and seconds per local training step, per method.

Each method runs in a fresh Python process (so peaks do not mix) that does what a ClientApp does
in a round: load the data, build the model for the method (FeDeRA's SVD factors come from this
parent process, as a client gets them from the server) and train `--steps` local steps of
minilm-l6 on the first `--examples` rows of rotten-tomatoes' train split. Figures are printed,
not asserted. On an edge device, the s/step it prints divided by ours is its slowdown factor.

    .venv/bin/python simulation/bench_memory.py [--methods federa fft] [--steps 10] [--threads 1]
        [--examples 500] [--batch-size 16] [--max-length 64] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from federa_app import data, models
from federa_app.config import METHODS, parse_run_config
from federa_app.training import set_threads, train_locally

MB = 1e6
MEM_KEYS = ("rss_data", "rss_model", "peak_build", "peak_rss", "cuda_peak")


class DeviceLoader:
    """Moves each batch to `device` and notes when it is fetched (= when a step starts).

    `train_locally` has no device argument and feeds the DataLoader's CPU batches to the model
    as they are, so on CUDA the batches are moved here, around the project's own loop.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, device: str) -> None:
        self.loader, self.device, self.fetched = loader, device, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            self.fetched.append(time.perf_counter())
            yield batch.to(self.device)


def peak_rss_mb() -> float:
    """This process's peak RSS so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def child(args: argparse.Namespace) -> dict:
    """One method, one process: data, model, `--steps` training steps; the figures as a dict."""
    overrides = {"method": args.child, "num-threads": args.threads, "local-steps": args.steps}
    overrides |= {"batch-size": args.batch_size, "max-length": args.max_length}
    cfg = parse_run_config(overrides)
    threads = set_threads(cfg)
    model_ref = models.resolve_model(cfg.model)
    train, _, labels = data.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    rows = train.select(range(min(args.examples, len(train))))
    tokenizer = models.load_tokenizer(model_ref)
    loader = data.make_loader(rows, tokenizer, cfg.batch_size, cfg.max_length, True, cfg.seed)
    rss_data = psutil.Process().memory_info().rss / MB
    factors = load_file(args.factors) if cfg.uses_svd_init else None
    model = models.build_model(cfg, model_ref, labels, factors).to(args.device)
    del factors
    rss_model, peak_build = psutil.Process().memory_info().rss / MB, peak_rss_mb()
    timed = DeviceLoader(loader, args.device)
    stats = train_locally(model, timed, cfg)
    if args.device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    steady = (end - timed.fetched[1]) / (cfg.local_steps - 1) if cfg.local_steps > 1 else None
    cuda_peak = torch.cuda.max_memory_allocated() / MB if args.device == "cuda" else None
    return {
        "method": cfg.method,
        "trainable": models.count_params(model)[0],
        "rss_data": rss_data,
        "rss_model": rss_model,
        "peak_build": peak_build,
        "peak_rss": peak_rss_mb(),
        "cuda_peak": cuda_peak,
        "step_s": stats["train_seconds"] / stats["steps"],
        "steady_step_s": steady,
        "threads": threads,
        "examples": len(rows),
    }


def machine_info(device: str) -> str:
    """CPU model, cores, memory, torch version (and the GPU), for the header line."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1] for line in lines if line.startswith("model name")]
        cpu = names[0].strip() if names else cpu
    info = f"machine: {cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 1e9:.1f} GB"
    info += f" RAM; {platform.system()} {platform.release()}; python {platform.python_version()}"
    info += f", torch {torch.__version__}"
    return info + (f"; GPU {torch.cuda.get_device_name()}" if device == "cuda" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all CPUs)")
    parser.add_argument("--examples", type=int, default=500, help="client data: first N rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--factors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False (no GPU/CUDA build)")
    if args.child:
        print(json.dumps(child(args)))
        return
    print(machine_info(args.device))
    keys = ("steps", "threads", "examples", "batch_size", "max_length", "device")
    common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        factors_file = Path(tmp) / "factors.safetensors"
        if any(m in ("federa", "federa-ffa") for m in args.methods):  # the server's part
            hf_logging.set_verbosity_error()  # the new head's load report, once, is noise here
            hf_logging.disable_progress_bar()
            warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated API
            cfg = parse_run_config({})
            model_ref = models.resolve_model(cfg.model)
            labels = data.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)[2]
            save_file(models.initial_factors(cfg, model_ref, labels), factors_file)
        for method in args.methods:
            command = [sys.executable, __file__, "--child", method, "--factors", str(factors_file)]
            done = subprocess.run(command + common, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"error: {method} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    r0 = results[0]
    print(
        f"minilm-l6 on rotten-tomatoes, {r0['examples']} client rows, {args.steps} steps of batch "
        f"{args.batch_size}, max length {args.max_length}, {r0['threads']} torch thread(s), "
        f"device {args.device}; one fresh process per method"
    )
    cols = ["trainable", "RSS data", "RSS model", "peak build", "peak RSS"]
    cols += ["CUDA peak"] * (args.device == "cuda") + ["s/step", "s/step 2+"]
    print(f"{'method':<10}" + "".join(f"{c:>11}" for c in cols))
    for r in results:
        cells = [f"{r['trainable']:,}"] + [f"{r[k]:.0f}" for k in MEM_KEYS if r[k] is not None]
        cells += [f"{r[k]:.3f}" if r[k] else "-" for k in ("step_s", "steady_step_s")]
        print(f"{r['method']:<10}" + "".join(f"{c:>11}" for c in cells))
    print(
        "memory in MB (1e6 B): RSS data = after imports, data and tokenizer; RSS model = after "
        "building the model; peak build / peak RSS = ru_maxrss after the build / of the whole "
        "process. s/step = train_locally's train_seconds / steps (what clients report); s/step "
        "2+ = steps 2.. only (no first-step warm-up). An edge device's s/step divided by this "
        "machine's is its device slowdown."
    )


if __name__ == "__main__":
    main()
