"""Run-config `precision`: bf16/fp16 autocast in local training, fp32 masters, one-line refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_toy_csv
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from federa_app.config import parse_run_config
from federa_app.data import loading
from federa_app.errors import ConfigError
from federa_app.federation import client
from federa_app.method import training
from federa_app.method.models import build_model, check_model_fits, load_tokenizer, trainable_state
from federa_app.method.training import check_precision, train_locally

LABELS = ("negative", "positive")


def _train(tmp_path, tiny_bert, precision: str, method: str = "lora"):
    """Build a model and train it 8 steps in `precision`; (model, state before, stats)."""
    csv = write_toy_csv(tmp_path / "toy.csv", rows=96)
    cfg = parse_run_config(
        {"model": str(tiny_bert), "dataset": f"csv:{csv}", "method": method, "lora-rank": 4,
         "lora-alpha": 8, "local-steps": 8, "batch-size": 16, "learning-rate": 0.01,
         "precision": precision}
    )  # fmt: skip
    rows, labels = loading.load_labelled(cfg.dataset)
    model = build_model(cfg, str(tiny_bert), tuple(labels))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loader = loading.make_loader(rows, load_tokenizer(str(tiny_bert)), 16, 32, True, cfg.seed)
    torch.manual_seed(0)  # the same dropout masks for both precisions
    return model, before, train_locally(model, loader, cfg)


@pytest.mark.parametrize("method", ["lora", "fft"])
def test_bf16_training_keeps_float32_masters_and_the_fp32_loss(
    tmp_path, tiny_bert, monkeypatch, method
):
    # bf16 is refused on CPUs without native bf16 (slow there); the numbers are the same either
    # way, so this test runs everywhere.
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    model32, start, stats32 = _train(tmp_path, tiny_bert, "fp32", method)
    model16, start16, stats16 = _train(tmp_path, tiny_bert, "bf16", method)
    assert all(torch.equal(start[n], start16[n]) for n in start)  # the same starting point

    params = dict(model16.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())  # masters, frozen ones too
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and all(not torch.equal(params[n], start[n]) for n in trained)
    frozen = set(params) - trained
    assert all(torch.equal(params[n], start[n]) for n in frozen)  # bit-identical W after bf16
    assert math.isfinite(stats16["train_loss"])
    assert abs(stats16["train_loss"] - stats32["train_loss"]) < 0.02 * stats32["train_loss"]
    # bf16 rounds differently: the trained tensors differ from fp32's, but far less than they
    # moved (over all of them: AdamW turns the rounding noise of a gradient that is zero in exact
    # arithmetic, such as a key bias's, into full-size steps).
    params32 = dict(model32.named_parameters())
    moved = torch.cat([(params32[n] - start[n]).flatten() for n in sorted(trained)]).norm()
    apart = torch.cat([(params[n] - params32[n]).flatten() for n in sorted(trained)]).norm()
    assert apart < 0.3 * moved
    assert all(v.dtype == torch.float32 for v in trainable_state(model16).values())  # the wire


def test_fp16_needs_cuda_and_says_so_in_one_line(tmp_path, tiny_bert, monkeypatch):
    with pytest.raises(ConfigError) as error:
        _train(tmp_path, tiny_bert, "fp16")  # the model sits on the CPU
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("run-config precision='fp16' is invalid here: ")
    assert "CUDA" in message and "bf16 or fp32" in message

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    cfg = parse_run_config({"model": str(tiny_bert), "precision": "fp16", "method": "lora"})
    with pytest.raises(ConfigError, match=r"precision='fp16' is invalid here: .*CUDA"):
        check_model_fits(cfg, str(tiny_bert), 2)  # the server's and `federa simulate`'s checks


def test_bf16_on_a_cpu_without_it_is_refused_before_anything_starts(tiny_bert, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    cfg = parse_run_config({"model": str(tiny_bert), "precision": "bf16", "method": "lora"})
    with pytest.raises(ConfigError) as error:
        check_model_fits(cfg, str(tiny_bert), 2)
    message = str(error.value)
    assert "\n" not in message and "precision='bf16'" in message
    assert "no native bfloat16" in message and "use precision=fp32" in message
    check_precision("fp32", "cpu")  # fp32 runs anywhere


def test_node_refuses_a_precision_it_cannot_run_before_loading_data(
    tiny_bert, server_identity, monkeypatch
):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded data despite an impossible precision")

    monkeypatch.setattr(loading, "cached_node_train_data", must_not_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = {"model": str(tiny_bert), "method": "lora", "precision": "fp16"}
    model = build_model(parse_run_config(config), str(tiny_bert), LABELS)
    train_config = ConfigRecord({"labels": list(LABELS), "server-round": 1})
    content = RecordDict({"arrays": ArrayRecord(trainable_state(model)), "config": train_config})
    msg = Message(content, dst_node_id=11, message_type="train")
    with pytest.raises(ConfigError, match="precision='fp16' is invalid here"):
        client.handle_train(msg, Context(1, 11, {"data": "csv:/x.csv"}, RecordDict(), config))


def test_this_machine_reports_its_bf16_from_cpuinfo(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(training, "Path", lambda _: fake)
    fake.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert training.cpu_has_bf16() is False  # AVX-512 alone: bf16 only emulated
    fake.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert training.cpu_has_bf16() is True
    fake.write_text("Features\t: fp asimd bf16 i8mm\n")  # arm64
    assert training.cpu_has_bf16() is True


def test_fp16_steps_go_through_the_grad_scaler(tmp_path, tiny_bert, monkeypatch):
    """The fp16 branch (GradScaler, unscale before clipping), run on the CPU: torch's CPU
    autocast and GradScaler take float16 too; the app itself sends fp16 to CUDA only."""
    monkeypatch.setattr(training, "check_precision", lambda precision, device: None)
    steps = []
    original_step = torch.amp.GradScaler.step

    def counted_step(self, optimizer, *args, **kwargs):
        steps.append(self.get_scale())
        return original_step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", counted_step)
    model, start, stats = _train(tmp_path, tiny_bert, "fp16")
    assert len(steps) == 8 and steps[0] == 2.0**16  # GradScaler's initial scale
    assert math.isfinite(stats["train_loss"])
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert any(not torch.equal(p, start[n]) for n, p in params.items() if p.requires_grad)
