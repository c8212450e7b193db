"""FeDeRA initialisation: the SVD runs once, on the server; clients derive W_res from its factors.

The scheme (DESIGN.md, decision 1):

1. The server runs peft's PiSSA init (`init_lora_weights="pissa"`, fp32 full SVD, or
   `"pissa_niter_N"` under a seeded RNG for `svd="randomized"`) on a copy of the base model and
   keeps only the initial factors A0 (r x in) and B0 (out x r) of every adapted matrix.
2. Every party, server included, builds the same model from the *unmodified* base weights with a
   cheap standard LoRA init and calls `apply_initial_factors`: lora_A <- A0, lora_B <- B0 and
   W_res <- W - scaling * B0 @ A0, computed in float64 in a fixed order of elementwise operations
   and rounded once to W's dtype, so that the residual is bit-identical on every platform (an
   x86 server and an arm64 node: BLAS builds sum a matmul in different orders).
3. The factors travel once per node per run: the server's `WireRecorder` adds them to the first
   message a node receives (counted in `bytes_down`) and the client keeps them in `context.state`.
   A node first sampled in round 17 thus gets bit-for-bit the residual a round-1 node got.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def factor_names(module_name: str, adapter: str = "default") -> tuple[str, str]:
    """Parameter names of lora_A / lora_B of one LoRA module (as in `named_parameters`)."""
    return (
        f"{module_name}.lora_A.{adapter}.weight",
        f"{module_name}.lora_B.{adapter}.weight",
    )


def compute_initial_factors(
    base_model: nn.Module, lora_config: LoraConfig, svd: str, niter: int, seed: int
) -> dict[str, torch.Tensor]:
    """Server only: peft's PiSSA init on a copy of `base_model`; {param name: A0 or B0}."""
    config = copy.deepcopy(lora_config)
    config.init_lora_weights = "pissa" if svd == "full" else f"pissa_niter_{niter}"
    with torch.random.fork_rng(devices=[]):
        # svd_lowrank draws from torch's global RNG and takes no generator.
        torch.manual_seed(seed)
        pissa_model = get_peft_model(copy.deepcopy(base_model), config)
    factors = {}
    for name, layer in lora_layers(pissa_model).items():
        a_name, b_name = factor_names(name)
        factors[a_name] = layer.lora_A["default"].weight.detach().float().clone()
        factors[b_name] = layer.lora_B["default"].weight.detach().float().clone()
    return factors


def residual_weight(
    weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scaling: float
) -> torch.Tensor:
    """W_res = W - scaling * B0 @ A0, bit-identical on every platform, rounded once to W's dtype.

    By hand, not `b0 @ a0`: a BLAS matmul's summation order differs between builds (x86 MKL or
    OpenBLAS, arm64 NEON kernels), even in float64. Here each rank-1 term is an exact float64
    product of two float32 numbers and the terms are added in rank order, each operation
    correctly rounded (IEEE 754), so every machine computes the same bits.
    """
    a64, b64 = a0.double(), b0.double()
    delta = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    for k in range(a64.shape[0]):
        delta.add_(torch.outer(b64[:, k], a64[k]))
    return (weight.double() - scaling * delta).to(weight.dtype)


def residual_digest(model: nn.Module) -> str:
    """sha256 of every LoRA layer's frozen base weight (W_res), in module order: equal digests on
    two machines mean bit-identical residuals."""
    digest = hashlib.sha256()
    for name, layer in lora_layers(model).items():
        weight = layer.get_base_layer().weight.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def apply_initial_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Set every LoRA layer to (A0, B0) and its frozen base weight to W - scaling * B0 @ A0.

    `model` must be a freshly built peft model whose base weights are the unmodified W.
    """
    layers = lora_layers(model)
    expected = {n for name in layers for n in factor_names(name)}
    if set(factors) != expected:
        missing = sorted(expected - set(factors))[:1] or sorted(set(factors) - expected)[:1]
        raise ValueError(f"initial factors do not match the model's LoRA layers (e.g. {missing})")
    for name, layer in layers.items():
        a_name, b_name = factor_names(name)
        a0, b0 = factors[a_name], factors[b_name]
        base = layer.get_base_layer()
        base.weight.copy_(residual_weight(base.weight, a0, b0, layer.scaling["default"]))
        layer.lora_A["default"].weight.copy_(a0)
        layer.lora_B["default"].weight.copy_(b0)
