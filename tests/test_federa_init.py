"""FeDeRA maths on a tiny random BERT: exact start, best rank-r factors, identical residuals."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from federa_app.config import parse_run_config
from federa_app.method.federa_init import lora_layers
from federa_app.method.models import build_model, initial_factors, load_base_model, trainable_state

LABELS = ("negative", "positive")


def _cfg(tiny_bert, **overrides):
    return parse_run_config({"model": str(tiny_bert), "lora-rank": 4, "lora-alpha": 8, **overrides})


def _inputs():
    torch.manual_seed(1)
    return {
        "input_ids": torch.randint(5, 30, (3, 9)),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }


def _through_the_wire(factors):
    """What a client receives: the factors serialised into an ArrayRecord and back."""
    return ArrayRecord(factors).to_torch_state_dict()


def test_output_unchanged_at_init(tiny_bert):
    for method in ("federa", "lora"):
        cfg = _cfg(tiny_bert, method=method)
        factors = initial_factors(cfg, str(tiny_bert), LABELS) if method == "federa" else None
        model = build_model(cfg, str(tiny_bert), LABELS, factors).eval()
        base = load_base_model(str(tiny_bert), LABELS, cfg.seed).eval()
        with torch.no_grad():
            delta = (model(**_inputs()).logits - base(**_inputs()).logits).abs().max().item()
        assert delta < 1e-5, (method, delta)


def test_factors_are_the_best_rank_r_approximation(tiny_bert):
    cfg = _cfg(tiny_bert)
    factors = initial_factors(cfg, str(tiny_bert), LABELS)
    model = build_model(cfg, str(tiny_bert), LABELS, factors)
    base = load_base_model(str(tiny_bert), LABELS, cfg.seed)
    original = dict(base.named_parameters())
    layers = lora_layers(model)
    assert len(layers) == 4  # query and value in each of 2 layers
    for name, layer in layers.items():
        weight = original[name.removeprefix("base_model.model.") + ".weight"].double()
        u, s, vh = torch.linalg.svd(weight)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        a0 = factors[f"{name}.lora_A.default.weight"].double()
        b0 = factors[f"{name}.lora_B.default.weight"].double()
        product = layer.scaling["default"] * b0 @ a0
        assert torch.allclose(product, best, atol=1e-5), name
        # and W_res + s * B0 @ A0 reproduces W
        w_res = layer.get_base_layer().weight.double()
        assert torch.allclose(w_res + product, weight, atol=1e-6), name


def test_client_residual_equals_server_residual_also_for_a_late_joiner(tiny_bert):
    cfg = _cfg(tiny_bert)
    factors = initial_factors(cfg, str(tiny_bert), LABELS)
    server = build_model(cfg, str(tiny_bert), LABELS, factors)
    early = build_model(cfg, str(tiny_bert), LABELS, _through_the_wire(factors))

    # Some rounds later the global adapter has moved away from (A0, B0) ...
    with torch.no_grad():
        for p in server.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    global_state = ArrayRecord(trainable_state(server)).to_torch_state_dict()
    # ... and a node sampled for the first time now builds its model from the same factors.
    late = build_model(cfg, str(tiny_bert), LABELS, _through_the_wire(factors))

    frozen = {n: p for n, p in server.named_parameters() if not p.requires_grad}
    for other in (early, late):
        other_frozen = dict(other.named_parameters())
        for name, tensor in frozen.items():
            assert torch.equal(tensor, other_frozen[name]), name  # bit for bit
    with torch.no_grad():
        for name, p in late.named_parameters():
            if p.requires_grad:
                p.copy_(global_state[name])
        assert torch.equal(server.eval()(**_inputs()).logits, late.eval()(**_inputs()).logits)


def test_randomized_svd_is_reproducible_with_its_seed(tiny_bert):
    first = initial_factors(_cfg(tiny_bert, svd="randomized", seed=7), str(tiny_bert), LABELS)
    again = initial_factors(_cfg(tiny_bert, svd="randomized", seed=7), str(tiny_bert), LABELS)
    other = initial_factors(_cfg(tiny_bert, svd="randomized", seed=8), str(tiny_bert), LABELS)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_trainable_tensors_are_adapter_factors_and_head(tiny_bert):
    cfg = _cfg(tiny_bert)
    model = build_model(cfg, str(tiny_bert), LABELS, initial_factors(cfg, str(tiny_bert), LABELS))
    names = set(trainable_state(model))
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    head = names - lora
    assert len(lora) == 8
    assert head == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    fft = build_model(_cfg(tiny_bert, method="fft"), str(tiny_bert), LABELS)
    assert set(trainable_state(fft)) == {n for n, _ in fft.named_parameters()}


def test_residual_is_the_same_bits_as_an_independent_fixed_order_computation():
    """W_res does not depend on a BLAS build: it equals numpy's float64 rank-1 sum in rank order,
    rounded once, bit for bit, with any number of threads (an arm64 node computes the same)."""
    import numpy as np

    from federa_app.method.federa_init import residual_weight

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 80, generator=gen)
    a0, b0 = torch.randn(8, 80, generator=gen), torch.randn(96, 8, generator=gen)
    a, b = a0.numpy().astype(np.float64), b0.numpy().astype(np.float64)
    delta = np.zeros((96, 80))
    for k in range(8):
        delta = delta + np.outer(b[:, k], a[k])
    expected = (weight.numpy().astype(np.float64) - 2.0 * delta).astype(np.float32)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = residual_weight(weight, a0, b0, 2.0)
            assert got.dtype == torch.float32
            assert np.array_equal(got.numpy(), expected)
    finally:
        torch.set_num_threads(threads)
    # A float32 matmul, the obvious way, is not what a node gets.
    assert not torch.equal(weight - 2.0 * (b0 @ a0), torch.from_numpy(expected))


def test_residual_digest_tells_equal_and_different_residuals_apart(tiny_bert):
    from federa_app.method.federa_init import residual_digest

    cfg = _cfg(tiny_bert)
    factors = initial_factors(cfg, str(tiny_bert), LABELS)
    one = build_model(cfg, str(tiny_bert), LABELS, factors)
    two = build_model(cfg, str(tiny_bert), LABELS, _through_the_wire(factors))
    assert residual_digest(one) == residual_digest(two)
    with torch.no_grad():
        next(iter(lora_layers(two).values())).get_base_layer().weight[0, 0] += 1e-6
    assert residual_digest(one) != residual_digest(two)
