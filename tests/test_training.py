"""The local training loop on a tiny BERT: it learns, honours FedProx's mu, epochs and schedules."""

from __future__ import annotations

from conftest import write_toy_csv

from federa_app.config import parse_run_config
from federa_app.data import loading
from federa_app.method.models import build_model, initial_factors, load_tokenizer, trainable_state
from federa_app.method.training import evaluate, train_locally


def _setup(tmp_path, tiny_bert, **overrides):
    csv = write_toy_csv(tmp_path / "toy.csv", rows=300)
    cfg = parse_run_config(
        {"model": str(tiny_bert), "dataset": f"csv:{csv}", "lora-rank": 4, "lora-alpha": 8,
         "batch-size": 16, "learning-rate": 0.01, **overrides}
    )  # fmt: skip
    dataset, labels = loading.load_labelled(cfg.dataset)
    factors = (
        initial_factors(cfg, str(tiny_bert), tuple(labels)) if cfg.method == "federa" else None
    )
    model = build_model(cfg, str(tiny_bert), tuple(labels), factors)
    loader = loading.make_loader(dataset, load_tokenizer(str(tiny_bert)), 16, 32, True, cfg.seed)
    return cfg, model, loader, len(labels)


def _drift(model, start):
    return sum((p.detach() - start[n]).pow(2).sum().item() for n, p in trainable(model).items())


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_fft_learns_the_toy_task(tmp_path, tiny_bert):
    cfg, model, loader, k = _setup(tmp_path, tiny_bert, method="fft", **{"local-steps": 60})
    before = evaluate(model, loader, k)
    stats = train_locally(model, loader, cfg)
    after = evaluate(model, loader, k)
    # 300 rows in batches of 16 = 19 batches per epoch: 60 steps = 3 epochs + 3 batches
    assert stats["steps"] == 60 and stats["examples_seen"] == 3 * 300 + 3 * 16
    assert after["loss"] < before["loss"] - 0.1
    assert after["accuracy"] > 0.8


def test_proximal_term_keeps_the_update_closer_to_the_global_model(tmp_path, tiny_bert):
    drifts = {}
    for mu in (0.0, 10.0):
        cfg, model, loader, _ = _setup(tmp_path, tiny_bert, **{"local-steps": 15})
        start = trainable_state(model)
        train_locally(model, loader, cfg, proximal_mu=mu)
        drifts[mu] = _drift(model, start)
    assert drifts[10.0] < 0.7 * drifts[0.0]


def test_local_epochs_replace_steps_and_linear_schedule_decays_to_zero(tmp_path, tiny_bert):
    cfg, model, loader, _ = _setup(
        tmp_path, tiny_bert, **{"local-epochs": 2, "lr-schedule": "linear", "warmup-ratio": 0.25}
    )
    stats = train_locally(model, loader, cfg)
    assert stats["steps"] == 2 * len(loader)
    assert stats["examples_seen"] == 2 * 300
