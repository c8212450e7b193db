"""Local training and evaluation: one AdamW loop and one evaluation pass, nothing else."""

from __future__ import annotations

import itertools
import os
import time

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from federa_app.config import RunConfig


def set_threads(cfg: RunConfig) -> int:
    """Use `num-threads`, else the CPUs this process was given (Ray sets OMP_NUM_THREADS)."""
    threads = cfg.num_threads or int(os.environ.get("OMP_NUM_THREADS", 0))
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


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
    for batch in itertools.islice(batches, steps):
        loss = model(**batch).loss
        if proximal_mu > 0:
            drift = sum((p - g).pow(2).sum() for p, g in zip(params, global_params, strict=True))
            loss = loss + proximal_mu / 2 * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
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
    """Accuracy, macro-F1 and mean cross-entropy loss of `model` on every batch of `loader`."""
    model.eval()
    loss_sum, predictions, labels = 0.0, [], []
    for batch in loader:
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
