"""Benchmark: a ClientApp's peak memory (RSS) and seconds per local training step, per method.

Each method (and precision) handles one train message in a fresh Python process, the way a
SuperNode's `flwr-clientapp` process does in deployment (Flower 1.42 starts one per message): the
process deserializes a Flower `Message` and its `Context`, calls the real ClientApp
(`client_app.app`: mods, `federa_app.federation.client.handle_train`) and serializes the reply.
This parent plays the server: it writes the node's own data (`data="csv:PATH"`: the first
`--examples` rows of rotten-tomatoes' train split), computes FeDeRA's SVD factors and each method's
global trainable tensors, and builds the messages. One warm-up process first fills the node cache
(the node's prepared rows, `FEDERA_NODE_CACHE` in a temporary directory), as a node's first message
does; the measured processes then find it warm, as every later message does. Figures are printed,
not asserted. On an edge device, the s/step it prints divided by ours is its slowdown
factor.

    .venv/bin/python benchmarks/bench_memory.py [--methods federa fft] [--steps 10] [--threads 1]
        [--examples 500] [--batch-size 16] [--max-length 64] [--device cpu|cuda]
        [--precision fp32 bf16] [--malloc-mmap-threshold 131072]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # client_app.py, the app's entry point, sits at the top level

from federa_app.config import METHODS, PRECISIONS  # noqa: E402 - light: no torch

MB = 1e6
NODE_ID = 11


def peak_rss_mb() -> float:
    """This process's peak RSS so far: VmHWM on Linux, else ru_maxrss (KiB; bytes on macOS).

    Not ru_maxrss on Linux: a child started from a large parent inherits the parent's peak in
    it (exec keeps the maximum of the old address space's), so it would read at least that.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def child(spec_file: str) -> dict:
    """One message in this fresh process, as `flwr-clientapp` handles it; the figures."""
    started = time.perf_counter()
    # The app tells a process-per-message ClientApp by its command name (one model copy, no
    # pre-trained cache: models.keeps_pretrained; the reply's process-seconds): be one.
    sys.argv[0] = "flwr-clientapp"
    from flwr.app import Context, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from client_app import app

    spec = json.loads(Path(spec_file).read_text())
    rss_start = psutil.Process().memory_info().rss / MB  # Flower and the app module, loaded
    msg = message_from_proto(ProtoMessage.FromString(Path(spec["message"]).read_bytes()))
    context = Context(1, NODE_ID, spec["node_config"], RecordDict(), spec["run_config"])
    reply = app(msg, context)
    if reply.has_error():
        raise RuntimeError(f"the ClientApp failed: {reply.error.reason}")
    sent = message_to_proto(reply).SerializeToString()  # what goes back to the SuperNode
    metrics = reply.content["metrics"]
    torch = sys.modules["torch"]
    cuda = torch.cuda.is_available()
    return {
        "rss_start": rss_start,
        "peak_rss": peak_rss_mb(),
        "cuda_peak": torch.cuda.max_memory_allocated() / MB if cuda else None,
        "step_s": metrics["train_seconds"] / spec["steps"],
        "client_s": metrics["client_seconds"],
        "process_s": time.perf_counter() - started,
        "threads": metrics["num-threads"],
        "examples": metrics["num-examples"],
        "reply_mb": len(sent) / MB,
        "heavy_imports": sorted(m for m in ("datasets", "pandas", "pyarrow") if m in sys.modules),
    }


def run_child(spec: dict, workdir: Path, name: str, args: argparse.Namespace) -> dict:
    """Write `spec`, run a fresh process on it; its figures (exit on failure)."""
    spec_file = workdir / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, FEDERA_NODE_CACHE=str(workdir / "node-cache"))
    if args.malloc_mmap_threshold:  # as a node's operator would set it for its SuperNode
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    device = args.device
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the node trains on its GPU when it sees one
    command = [sys.executable, __file__, "--child", str(spec_file)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_node_csv(path: Path, examples: int) -> tuple[str, ...]:
    """The node's own file: the first rows of the run's train split; the server's label names."""
    from federa_app.config import parse_run_config
    from federa_app.data import loading

    cfg = parse_run_config({})
    train, _, labels = loading.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    rows = train.select(range(min(examples, len(train))))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for text, label in zip(rows["text"], rows["label"], strict=True):
            writer.writerow([text, labels[label]])
    return labels


def train_message(run_config: dict, labels: tuple[str, ...], factors: dict | None, path: Path):
    """The server's first train message to a node, serialized to `path`: the global trainable
    tensors, the train config and, for FeDeRA, its initial factors (as the server's WireRecorder
    adds them to a node's first message)."""
    from flwr.app import ArrayRecord, Metadata, RecordDict
    from flwr.app.message import make_message
    from flwr.common.serde import message_to_proto

    from federa_app.config import parse_run_config
    from federa_app.federation.server import make_train_config
    from federa_app.federation.wire import INIT_FACTORS_KEY
    from federa_app.method import models

    cfg = parse_run_config(run_config)
    model_ref = models.resolve_model(cfg.model)
    model = models.build_model(cfg, model_ref, labels, factors if cfg.uses_svd_init else None)
    trainable = models.count_params(model)[0]
    train_config = make_train_config(labels)
    train_config["server-round"] = 1
    content = RecordDict(
        {"arrays": ArrayRecord(models.trainable_state(model)), "config": train_config}
    )
    if cfg.uses_svd_init:
        content[INIT_FACTORS_KEY] = ArrayRecord(factors)
    metadata = Metadata(1, "", 1, NODE_ID, "", "1", time.time(), 3600.0, "train")
    path.write_bytes(message_to_proto(make_message(metadata, content)).SerializeToString())
    return trainable


def machine_info(device: str) -> str:
    """CPU model, cores, memory, load, torch version (and the GPU), for the header line."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1] for line in lines if line.startswith("model name")]
        cpu = names[0].strip() if names else cpu
    info = f"machine: {cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 1e9:.1f} GB"
    info += f" RAM; {platform.system()} {platform.release()}; python {platform.python_version()}"
    info += f", torch {torch.__version__}"
    info += "; load average " + " ".join(f"{load:.1f}" for load in os.getloadavg())
    return info + (f"; GPU {torch.cuda.get_device_name()}" if device == "cuda" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all CPUs)")
    parser.add_argument("--examples", type=int, default=500, help="node data: first N rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=PRECISIONS, help="run-config precision"
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="set glibc's MALLOC_MMAP_THRESHOLD_ for the ClientApp processes (0: glibc's "
        "dynamic default); 131072 returns freed activations at once: lower peak, slower steps",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return

    import torch
    from transformers.utils import logging as hf_logging

    from federa_app.config import parse_run_config
    from federa_app.method import models

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False (no GPU/CUDA build)")
    hf_logging.set_verbosity_error()  # the new head's load report, once per model, is noise here
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated API
    print(machine_info(args.device), flush=True)
    common = {"num-threads": args.threads, "local-steps": args.steps}
    common |= {"batch-size": args.batch_size, "max-length": args.max_length}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        node_csv = workdir / "node.csv"
        labels = write_node_csv(node_csv, args.examples)
        node_config = {"data": f"csv:{node_csv}"}
        factors = None
        if any(m in ("federa", "federa-ffa") for m in args.methods):  # the server's SVD
            cfg = parse_run_config({})
            factors = models.initial_factors(cfg, models.resolve_model(cfg.model), labels)
        cells = [(method, p) for p in args.precision for method in args.methods]
        for i, (method, precision) in enumerate(cells):
            # fp32 is the default: left out, the run config also suits a build without the key
            run_config = {"method": method, **common}
            run_config |= {"precision": precision} if precision != "fp32" else {}
            message = workdir / f"message-{i}.pb"
            trainable = train_message(run_config, labels, factors, message)
            spec = {"message": str(message), "node_config": node_config}
            spec |= {"run_config": run_config, "steps": args.steps}
            if i == 0:  # the node's first message: reads its file, fills the node cache
                cold = run_child(spec, workdir, "warm-up", args)
            figures = run_child(spec, workdir, f"{method}-{precision}", args)
            results.append({"method": method, "precision": precision, "trainable": trainable})
            results[-1] |= figures

    r0 = results[0]
    print(
        f"minilm-l6, node data {r0['examples']} rotten-tomatoes rows (csv), {args.steps} steps of "
        f"batch {args.batch_size}, max length {args.max_length}, {r0['threads']} torch "
        f"thread(s), device {args.device}; one fresh ClientApp process per message, node cache "
        "warm; MALLOC_MMAP_THRESHOLD_ "
        + (str(args.malloc_mmap_threshold) if args.malloc_mmap_threshold else "unset")
    )
    cols = ["precision", "trainable", "RSS start", "peak RSS"]
    cols += ["CUDA peak"] * (args.device == "cuda") + ["s/step", "client s", "process s"]
    print(f"{'method':<11}" + "".join(f"{c:>11}" for c in cols))
    for r in results:
        cells = [r["precision"], f"{r['trainable']:,}", f"{r['rss_start']:.0f}"]
        cells += [f"{r['peak_rss']:.0f}"]
        if args.device == "cuda":
            cells.append(f"{r['cuda_peak']:.0f}" if r["cuda_peak"] is not None else "-")
        cells += [f"{r['step_s']:.3f}", f"{r['client_s']:.2f}", f"{r['process_s']:.2f}"]
        print(f"{r['method']:<11}" + "".join(f"{c:>11}" for c in cells))
    for precision in args.precision:
        peak = {r["method"]: r["peak_rss"] for r in results if r["precision"] == precision}
        if "federa" in peak and "fft" in peak:
            print(
                f"{precision}: federa / fft peak RSS = {peak['federa']:.0f} / {peak['fft']:.0f} MB"
                f" = {peak['federa'] / peak['fft']:.2f}"
            )
    for method in args.methods:
        step = {r["precision"]: r["step_s"] for r in results if r["method"] == method}
        for precision in set(step) - {"fp32"}:
            if "fp32" in step:
                print(
                    f"{method}: {precision} / fp32 s/step = {step[precision]:.3f} / "
                    f"{step['fp32']:.3f} = {step[precision] / step['fp32']:.2f}"
                )
    heavy = sorted({m for r in results for m in r["heavy_imports"]})
    print(
        f"warm-up (the node's first message, cold node cache: {cold['heavy_imports'] or 'no'} "
        f"imported): peak RSS {cold['peak_rss']:.0f} MB, process {cold['process_s']:.2f} s; "
        f"warm messages imported {heavy or 'no datasets, pandas or pyarrow'}"
    )
    print(
        "memory in MB (1e6 B): RSS start = after importing Flower and the ClientApp module; peak "
        "RSS = the process's high-water RSS (VmHWM: message in, training, reply serialized). "
        "s/step = the reply's train_seconds / steps (what clients report); client s = "
        "handle_train's client_seconds; process s = the process's wall time from its first "
        "import on, interpreter start excluded."
    )


if __name__ == "__main__":
    main()
