"""Local training and evaluation: one AdamW loop and one evaluation pass, nothing else."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from federa_app.config import RunConfig
from federa_app.errors import ConfigError

# run-config `precision` -> the dtype local training autocasts to (fp32: no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def omp_threads() -> int:
    """OMP_NUM_THREADS as a thread count; 0 when it is unset, empty or an OpenMP list ("4,2")."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() else 0


def set_threads(cfg: RunConfig) -> int:
    """Use `num-threads`, else the CPUs this process was given (Ray sets OMP_NUM_THREADS)."""
    threads = cfg.num_threads or omp_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def train_device() -> torch.device:
    """Where a node trains: its CUDA GPU when torch sees one, else the CPU.

    `CUDA_VISIBLE_DEVICES=""` in a node's environment keeps it on the CPU.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 natively: avx512_bf16 or amx_bf16 (x86), bf16 (arm).

    Without it torch still runs bf16, emulated and slower than fp32, so it is refused.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: x86 "flags", arm "Features"
        words = set(cpuinfo.read_text(errors="replace").split())
        return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})
    if platform.machine().lower() in ("x86_64", "amd64"):  # torch's own cpuinfo, where it has it
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # arm64 macOS and others


def check_precision(precision: str, device: torch.device | str) -> None:
    """One-line ConfigError unless `device` can train in run-config `precision`."""
    device = torch.device(device)
    problem = ""
    if precision == "fp16" and device.type != "cuda":
        seen = "" if torch.cuda.is_available() else " (torch sees no GPU here)"
        problem = (
            f"float16 training runs on a CUDA GPU only, and this model trains on the "
            f"{device.type}{seen}; use precision=bf16 or fp32"
        )
    elif precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problem = f"GPU {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32"
    elif precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        problem = (
            f"this {platform.machine()} CPU has no native bfloat16 (avx512_bf16 or amx_bf16 on "
            "x86, bf16 on arm), where bf16 is emulated and slower than fp32; use precision=fp32"
        )
    if problem:
        raise ConfigError(f"run-config precision={precision!r} is invalid here: {problem}")


@contextlib.contextmanager
def reduced_precision(
    model: nn.Module, dtype: torch.dtype | None, device: torch.device
) -> Iterator[None]:
    """Prepare `model` for autocast training in `dtype` meanwhile; restore it exactly after.

    Two things make bf16 pay on a CPU (minilm-l6 LoRA, batch 16 x 64, one thread: ~0.63x the
    fp32 step with plain autocast, ~0.55x with these; README "Benchmarks"):
    - attention: with dropout, torch's SDPA has no fused CPU kernel and falls back to its math
      path, which upcasts bf16 inputs to fp32 and back; transformers' eager attention (the same
      maths: matmul, mask, softmax, dropout, matmul) stays in bf16 under autocast. CUDA keeps
      SDPA, whose fused kernels take bf16/fp16 with dropout;
    - frozen matrices: autocast casts a frozen fp32 weight anew in every forward (it caches casts
      of trainable leaves only); each frozen nn.Linear weight is cast once instead, giving the
      same numbers.
    Trainable tensors (LoRA factors, head, everything for fft) stay float32 masters; the frozen
    fp32 originals come back untouched, so W_res and what is sent do not depend on `precision`.
    """
    if dtype is None:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
    eager = (
        device.type == "cpu" and attention == "sdpa" and hasattr(base, "set_attn_implementation")
    )
    swapped = []
    try:
        if eager:
            base.set_attn_implementation("eager")
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and not weight.requires_grad:
                if weight.dtype == torch.float32:  # a tied weight is cast once
                    swapped.append((weight, weight.data))
                    weight.data = weight.data.to(dtype)
        yield
    finally:
        for weight, original in swapped:
            weight.data = original
        if eager:
            base.set_attn_implementation(attention)


def train_locally(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    cfg: RunConfig,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train for `local-steps` batches (or `local-epochs` passes); return loss, steps, seconds.

    With `proximal_mu` > 0 (FedProx sends it) the loss gets mu/2 * ||w - w_global||^2 over the
    trainable tensors, w_global being their values when training starts.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device  # batches follow the model (the caller placed it)
    check_precision(cfg.precision, device)
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    # float16's narrow range underflows small gradients: scale the loss (bf16 has fp32's range).
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    params = [p for p in model.parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    steps = cfg.local_epochs * len(loader) if cfg.local_epochs > 0 else cfg.local_steps
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "linear":
        warmup = int(cfg.warmup_ratio * steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # cycle past an epoch
    loss_sum, examples = 0.0, 0
    with reduced_precision(model, dtype, device):
        for batch in itertools.islice(batches, steps):
            batch = {key: value.to(device) for key, value in batch.items()}
            # Forward under autocast (its backward runs in the forward's dtypes); the loss, the
            # proximal term and the optimiser step stay float32.
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss.float()
            if proximal_mu > 0:
                drift = sum(
                    (p - g).pow(2).sum() for p, g in zip(params, global_params, strict=True)
                )
                loss = loss + proximal_mu / 2 * drift
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                if cfg.max_grad_norm > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()
            scheduler.step()
            n = len(batch["labels"])
            loss_sum += loss.item() * n
            examples += n
    model.eval()
    return {
        "train_loss": loss_sum / max(examples, 1),
        "steps": steps,
        "examples_seen": examples,
        "train_seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, num_labels: int) -> dict:
    """Accuracy, macro-F1 and mean cross-entropy loss of `model` on every batch of `loader`.

    Always in float32, whatever `precision` local training used.
    """
    model.eval()
    device = next(model.parameters()).device
    loss_sum, predictions, labels = 0.0, [], []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        out = model(**batch)
        loss_sum += out.loss.item() * len(batch["labels"])
        predictions.append(out.logits.argmax(-1))
        labels.append(batch["labels"])
    pred, true = torch.cat(predictions), torch.cat(labels)
    # Macro-F1 by hand: a confusion matrix is three lines; scikit-learn would be a large dependency.
    confusion = torch.bincount(true * num_labels + pred, minlength=num_labels**2)
    confusion = confusion.reshape(num_labels, num_labels).double()
    tp = confusion.diag()
    f1 = 2 * tp / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    return {
        "accuracy": (pred == true).double().mean().item(),
        "macro_f1": f1[present].mean().item(),
        "loss": loss_sum / len(true),
        "examples": len(true),
    }
