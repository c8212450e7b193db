"""Models: resolve a model name, build the model for a method, and move its trainable tensors.

Methods (what trains and travels, besides the classification head):
- `federa`: LoRA A and B, initialised from the SVD of W (see `federa_init`);
- `lora`: LoRA A and B with peft's standard init (Kaiming A, zero B);
- `ffa-lora` / `federa-ffa`: only B; A stays frozen at its (random / SVD) init (FFA-LoRA);
- `bitfit`: every bias; `adapter`: Houlsby bottleneck adapters (see `adapters`);
- `fft`: every weight.
For the LoRA methods the head is a peft `modules_to_save` module, so it trains with the adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from federa_app.config import METHODS, RunConfig
from federa_app.data import assets
from federa_app.errors import AssetError, ConfigError
from federa_app.method.adapters import adapter_sites, add_adapters
from federa_app.method.federa_init import (
    apply_initial_factors,
    compute_initial_factors,
    lora_layers,
)
from federa_app.method.training import check_precision, train_device

NAMED_MODELS = assets.MODEL_ASSETS
ADAPTER_WEIGHTS = "bottleneck_adapters.safetensors"
ADAPTER_CONFIG = "bottleneck_adapters.json"


def resolve_model(model: str) -> str:
    """A named model's cached directory, a local model directory, or a hub id, as given."""
    if model in NAMED_MODELS:
        return str(assets.asset_path(model))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model directory {model!r} has no config.json; valid models are "
                f"{', '.join(NAMED_MODELS)}, a local Hugging Face model directory or a hub id"
            )
        return str(path.resolve())
    return model


@functools.lru_cache(maxsize=4)
def load_model_config(model_ref: str) -> AutoConfig:
    """The model's transformers config (cheap); a clear error for unreachable hub ids."""
    try:
        return AutoConfig.from_pretrained(model_ref)
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"model {model_ref!r} is not a named model ({', '.join(NAMED_MODELS)}), not a local "
            f"directory, and could not be loaded from the Hugging Face hub (offline?): "
            f"{str(exc).splitlines()[0]}"
        ) from None


def load_tokenizer(model_ref: str):  # noqa: ANN201 - transformers returns several tokenizer types
    """The model's tokenizer."""
    return AutoTokenizer.from_pretrained(model_ref)


# Whether this process keeps the pre-trained model in memory between builds (`pretrained_model`)
# and copies it for each model it builds. Worth it where models are built again and again: the
# server, the Ray simulation's client actors, a worker kept warm between messages. A process that
# handles a single message (Flower's `flwr-clientapp`, started afresh for every message) builds
# one model: it loads the weights straight into that model, so it holds one copy, not two.
# None = decide by the process (`keeps_pretrained`); True/False force it.
KEEP_PRETRAINED: bool | None = None


def per_message_process() -> bool:
    """Whether this process is Flower's `flwr-clientapp`, started afresh for every message."""
    return os.path.basename(sys.argv[0]).startswith("flwr-clientapp")


def keeps_pretrained() -> bool:
    """`KEEP_PRETRAINED`, or when None: keep, unless this process is a `flwr-clientapp`."""
    if KEEP_PRETRAINED is not None:
        return KEEP_PRETRAINED
    return not per_message_process()


def _load_pretrained(model_ref: str, labels: tuple[str, ...], seed: int) -> nn.Module:
    """The pre-trained model with a seeded new head, read from disk."""
    torch.manual_seed(seed)  # a new head (and any missing weight) starts identical everywhere
    model = AutoModelForSequenceClassification.from_pretrained(
        model_ref,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        dtype=torch.float32,
    )
    return model.eval()


@functools.lru_cache(maxsize=2)
def pretrained_model(model_ref: str, labels: tuple[str, ...], seed: int) -> nn.Module:
    """The pre-trained model with a seeded new head, loaded once per process; never mutate it."""
    return _load_pretrained(model_ref, labels, seed)


def load_base_model(model_ref: str, labels: tuple[str, ...], seed: int) -> nn.Module:
    """A fresh pre-trained model with a seeded new head, the caller's to change.

    A copy of the cached `pretrained_model` where this process keeps it (`keeps_pretrained`),
    else read from disk (the same weights and head, without a second copy in memory).
    """
    if keeps_pretrained():
        return copy.deepcopy(pretrained_model(model_ref, tuple(labels), seed))
    return _load_pretrained(model_ref, tuple(labels), seed)


def target_modules(cfg: RunConfig, model_ref: str) -> list[str]:
    """The LoRA target modules: `target-modules` if set, else peft's default for the model type."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    model_type = load_model_config(model_ref).model_type
    default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not default:
        raise ConfigError(
            f"peft has no default LoRA targets for model type {model_type!r}: "
            'set target-modules, e.g. target-modules="q_proj,v_proj"'
        )
    return list(default)


def lora_config(cfg: RunConfig, model_ref: str) -> LoraConfig:
    """The peft LoraConfig for `lora`/`federa`; the standard init, FeDeRA factors come later."""
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg, model_ref),
        init_lora_weights=True,
    )


HEAD_PREFIXES = ("classifier.", "score.")  # the new task head of a sequence classifier


def check_model_fits(cfg: RunConfig, model_ref: str, num_labels: int) -> None:
    """Fail early when adapters or LoRA targets match nothing, a rank exceeds its matrix, or
    this machine cannot train in the run's `precision`."""
    check_precision(cfg.precision, train_device())
    model_config = copy.deepcopy(load_model_config(model_ref))
    model_config.num_labels = num_labels
    with torch.device("meta"):  # shapes only: no memory, no weights read
        skeleton = AutoModelForSequenceClassification.from_config(model_config)
    if cfg.method == "adapter" and not adapter_sites(skeleton):
        raise ConfigError(
            f"method adapter needs BERT-style layers (...attention.output.dense, ...output.dense); "
            f"{model_ref} has none: use another method"
        )
    if not cfg.uses_lora:
        return
    config = lora_config(cfg, model_ref)
    linear = {n: m for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
    matched = {n: m for n, m in linear.items() if check_target_module_exists(config, n)}
    if not matched:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(
            f"target-modules {','.join(config.target_modules)!r} match no linear layer of "
            f"{model_ref}; its linear layers are named {', '.join(names)}"
        )
    for name, module in matched.items():
        limit = min(module.in_features, module.out_features)
        if cfg.lora_rank > limit:
            raise ConfigError(
                f"lora-rank={cfg.lora_rank} is larger than {name} "
                f"({module.out_features}x{module.in_features}) allows: use lora-rank <= {limit}"
            )


def initial_factors(cfg: RunConfig, model_ref: str, labels: tuple[str, ...]) -> dict:
    """Server only, FeDeRA only: the SVD-derived initial factors (A0, B0) by parameter name."""
    base = pretrained_model(model_ref, tuple(labels), cfg.seed)
    return compute_initial_factors(
        base, lora_config(cfg, model_ref), cfg.svd, cfg.svd_niter, cfg.seed
    )


def build_model(
    cfg: RunConfig,
    model_ref: str,
    labels: tuple[str, ...],
    factors: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The model a method trains; the SVD-initialised methods need the server's factors."""
    model = load_base_model(model_ref, labels, cfg.seed)
    torch.manual_seed(cfg.seed)  # new weights (LoRA A, adapters) start identical on every party
    if cfg.method == "fft":
        return model.requires_grad_(True)
    if cfg.method in ("bitfit", "adapter"):
        model.requires_grad_(False)
        if cfg.method == "adapter":
            add_adapters(model, cfg.adapter_size)  # new modules: trainable
        for name, param in model.named_parameters():
            if name.startswith(HEAD_PREFIXES) or (cfg.method == "bitfit" and name.endswith("bias")):
                param.requires_grad_(True)
        return model
    model = get_peft_model(model, lora_config(cfg, model_ref))
    if cfg.uses_svd_init:
        if factors is None:
            raise ValueError(f"method {cfg.method} needs the server's initial factors")
        apply_initial_factors(model, factors)
    if cfg.method in ("ffa-lora", "federa-ffa"):
        for layer in lora_layers(model).values():
            layer.lora_A["default"].weight.requires_grad_(False)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot (cloned) of the tensors that train and travel, by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy received tensors into the trainable parameters; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        extra = sorted(set(state) - set(params))[:1]
        missing = sorted(set(params) - set(state))[:1]
        raise ValueError(
            f"arrays do not match the trainable tensors: extra {extra}, missing {missing}"
        )
    for name, tensor in state.items():
        params[name].copy_(tensor)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft's frozen head copy is not counted twice."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    return trainable, total


def save_final_model(
    model: nn.Module, cfg: RunConfig, out_dir: Path, factors: dict[str, torch.Tensor] | None
) -> None:
    """Save what `adapter/` holds: loadable with plain transformers + peft on the unmodified base.

    fft, bitfit: the whole fine-tuned model. lora, ffa-lora: the peft adapter. federa,
    federa-ffa: peft's PiSSA-to-LoRA conversion (rank 2r, delta = [B | -B0] @ [A ; A0]), so
    loading needs no SVD. adapter: its trainable tensors, rebuilt by `load_saved_model`.
    """
    out_dir = Path(out_dir)
    if cfg.method == "adapter":
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(model), out_dir / ADAPTER_WEIGHTS)
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps({"adapter-size": cfg.adapter_size}))
        return
    if not cfg.uses_svd_init:
        model.save_pretrained(out_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / "initial"
        initial = copy.deepcopy(model)
        with torch.no_grad():
            params = dict(initial.named_parameters())
            for name, tensor in factors.items():
                params[name].copy_(tensor)
        initial.save_pretrained(init_dir)
        del initial
        model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(init_dir))
    # peft 0.21's conversion keeps only lora_A/lora_B and drops modules_to_save (the head): add
    # the trained head back so the adapter is complete.
    weights_file = out_dir / "adapter_model.safetensors"
    converted = load_file(weights_file)
    for name, tensor in get_peft_model_state_dict(model).items():
        if "lora_" not in name:
            converted[name] = tensor.detach().clone().contiguous()
    save_file(converted, weights_file, metadata={"format": "pt"})


def load_saved_model(adapter_dir: Path, base_ref: str, labels: tuple[str, ...]) -> nn.Module:
    """Load `adapter/` the way a user would: plain transformers (+ peft for a LoRA adapter)."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "config.json").exists():  # fft, bitfit: a whole model
        return AutoModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    base = AutoModelForSequenceClassification.from_pretrained(
        base_ref, num_labels=len(labels), id2label=dict(enumerate(labels))
    )
    if (adapter_dir / ADAPTER_CONFIG).exists():  # bottleneck adapters: no library loads them
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        add_adapters(base, config["adapter-size"])
        unexpected = base.load_state_dict(load_file(adapter_dir / ADAPTER_WEIGHTS), strict=False)[1]
        if unexpected:
            raise ValueError(f"{adapter_dir} holds tensors the model lacks, e.g. {unexpected[0]}")
        return base.eval()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def write_labels(out_dir: Path, labels: tuple[str, ...]) -> None:
    """Record the label names next to the saved model (index = class id)."""
    (Path(out_dir) / "labels.json").write_text(json.dumps(list(labels)))


def method_table(cfg: RunConfig, model_ref: str, labels: tuple[str, ...]) -> list[dict]:
    """Per method: trainable parameters, their share of the model, and tensor bytes per round.

    Bytes are what one client receives and sends back per round (Flower's count: payload, .npy
    headers, names); the SVD-initialised methods also receive their factors once per node.
    """
    svd_factors = initial_factors(cfg, model_ref, labels)  # the same for every SVD method
    rows = []
    for method in METHODS:
        method_cfg = dataclasses.replace(cfg, method=method)
        factors = svd_factors if method_cfg.uses_svd_init else None
        model = build_model(method_cfg, model_ref, labels, factors)
        trainable, total = count_params(model)
        rows.append(
            {
                "method": method,
                "trainable_params": trainable,
                "total_params": total,
                "fraction": trainable / total,
                "bytes_per_round": ArrayRecord(trainable_state(model)).count_bytes(),
                "bytes_once": ArrayRecord(factors).count_bytes() if factors else 0,
            }
        )
    return rows
