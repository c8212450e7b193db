"""Benchmark: FeDeRA's SVD init time (the server's one-off cost), full vs randomized SVD.

Times `federa_init.compute_initial_factors` (what `models.initial_factors` runs once the model is
loaded, and what the server's `svd_seconds` measures: peft's PiSSA init on a copy of the model)
for minilm-l6 (real weights) and a bert-base-sized encoder (12 layers, 768 wide, random weights
from BertConfig: nothing is downloaded). Figures are printed, not asserted.

    .venv/bin/python benchmarks/bench_svd.py [--repeats 3] [--threads 0] [--lora-rank 8]
        [--svd-niter 4] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig
from transformers.utils import logging as hf_logging

from federa_app.config import RunConfig, parse_run_config
from federa_app.method import models
from federa_app.method.federa_init import compute_initial_factors
from federa_app.method.training import set_threads

LABELS = ("fresh", "rotten")  # rotten-tomatoes' two classes: the head's size only


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), for the header line."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def bert_base(config_dir: str, seed: int) -> nn.Module:
    """A randomly initialised bert-base-sized classifier; its config.json goes to `config_dir`.

    The project resolves the LoRA target modules from a model's config (`models.lora_config`),
    so the config, not the 440 MB of weights, is saved.
    """
    config = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=len(LABELS),
    )
    config.save_pretrained(config_dir)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def time_factors(
    base: nn.Module, cfg: RunConfig, model_ref: str, repeats: int, device: str
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Seconds of each of `repeats` calls of compute_initial_factors, and the last factors."""
    lora = models.lora_config(cfg, model_ref)
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        factors = compute_initial_factors(base, lora, cfg.svd, cfg.svd_niter, cfg.seed)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds, factors


def compare(factors: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> tuple:
    """(max relative distance, min energy ratio) of the B0 @ A0 products to the full SVD's."""
    dists, energies = [], []
    for a_name in (n for n in full if ".lora_A." in n):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        exact, approx = full[b_name] @ full[a_name], factors[b_name] @ factors[a_name]
        dists.append(((approx - exact).norm() / exact.norm()).item())
        energies.append((approx.norm() / exact.norm()).item() ** 2)
    return max(dists), min(energies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="0: all CPUs")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--svd-niter", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False (no GPU/CUDA build)")
    hf_logging.set_verbosity_error()  # minilm's new-head load report is noise here
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated helper
    gpu = f"; GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs; {platform.system()} {platform.release()};"
        f" python {platform.python_version()}, torch {torch.__version__}; device {args.device}"
        f"{gpu}; seconds over {args.repeats} repeats"
    )
    print(
        f"{'model':<10} {'matrices':>8} {'shape':>8} {'rank':>4} {'svd':<10} {'threads':>7} "
        f"{'median s':>8} {'min s':>7} {'max s':>7} {'dist':>5} {'energy':>6}"
    )
    common = {"lora-rank": args.lora_rank, "svd-niter": args.svd_niter}
    with tempfile.TemporaryDirectory() as tmp:
        minilm = models.resolve_model("minilm-l6")
        seed = parse_run_config({}).seed
        for name, model_ref in (("minilm-l6", minilm), ("bert-base", tmp)):
            if name == "minilm-l6":
                base = models.load_base_model(minilm, LABELS, seed).to(args.device)
            else:
                base = bert_base(tmp, seed).to(args.device)
            for svd in ("full", "randomized"):
                for threads in args.threads:
                    cfg = parse_run_config({"svd": svd, "num-threads": threads, **common})
                    used = set_threads(cfg)
                    seconds, factors = time_factors(base, cfg, model_ref, args.repeats, args.device)
                    if svd == "full":
                        full = factors
                    dist, energy = compare(factors, full)
                    a_names = [n for n in factors if ".lora_A." in n]
                    shapes = {
                        (len(factors[n.replace("_A.", "_B.")]), factors[n].shape[1])
                        for n in a_names
                    }
                    shape = ",".join(f"{o}x{i}" for o, i in sorted(shapes))
                    label = svd if svd == "full" else f"rand n={cfg.svd_niter}"
                    print(
                        f"{name:<10} {len(a_names):>8} {shape:>8} "
                        f"{factors[a_names[0]].shape[0]:>4} {label:<10} {used:>7} "
                        f"{statistics.median(seconds):>8.3f} {min(seconds):>7.3f} "
                        f"{max(seconds):>7.3f} {dist:>5.2f} {energy:>6.3f}"
                    )
            del base
    print(
        "matrices = adapted weight matrices (peft's default for BERT: "
        "query, value; shape: out x in); seconds = one compute_initial_factors call (model copy + "
        "SVD of every matrix), i.e. the server's svd_seconds; dist = max over matrices of "
        "||B0A0 - B0A0(full)|| / ||B0A0(full)||; energy = min over matrices of "
        "||B0A0||^2 / ||B0A0(full)||^2 (1.0: the randomized SVD found as much of W as the top-r)."
    )


if __name__ == "__main__":
    main()
