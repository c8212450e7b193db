"""Run config: the keys of `[tool.flwr.app.config]`, their types, defaults and valid ranges.

Flower hands both apps `context.run_config` as a plain dict; `parse_run_config` turns it into a
typed, validated `RunConfig` and raises a one-line `ConfigError` for anything unknown or out of
range, before any model or data is loaded. `pyproject.toml` mirrors `DEFAULTS` (a test checks it).
"""

from __future__ import annotations

import math
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from federa_app.errors import ConfigError

METHODS = ("federa", "lora", "fft", "bitfit", "adapter", "ffa-lora", "federa-ffa")
STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
    "svd-avg",
)
SVD_MODES = ("full", "randomized")
# Flower's four central-DP strategy wrappers (and, for client-*, the matching client mods).
DP_MODES = ("none", "client-fixed", "client-adaptive", "server-fixed", "server-adaptive")
LR_SCHEDULES = ("constant", "linear")
# Local training's arithmetic: fp32, or autocast to bfloat16 (CPU and CUDA) or float16 (CUDA, with
# a GradScaler); master weights, optimiser state and the wire stay float32 (training.py). Whether
# this machine can train in it is checked with the model (models.check_model_fits) and on nodes.
PRECISIONS = ("fp32", "bf16", "fp16")
# Flower 1.42 implements SecAgg+ only for the legacy API (flwr.server.workflow.SecAggPlusWorkflow
# needs a LegacyContext and `fitins`/`fitres` records); this app uses the Message API strategies.
SECAGG_UNAVAILABLE = (
    "Flower 1.42 offers SecAgg+ only for its legacy strategy API (SecAggPlusWorkflow with "
    "LegacyContext), not for the Message API strategies this app runs, so no strategy or method "
    "works with it; use secagg=false (dp=client-fixed or client-adaptive clips on the node)"
)
PARTITIONER_CHOICES: tuple[str, ...] = ("dirichlet", "iid", "pathological", "column:NAME")
PARTITIONER_HELP = ", ".join(PARTITIONER_CHOICES)


def partition_advice(spec: str) -> str:
    """What a user can change when partitions come out empty or impossible."""
    if spec == "dirichlet":
        return "use a larger dirichlet-alpha or fewer clients"
    if spec == "pathological":
        return "use fewer clients or fewer classes-per-client"
    return "use fewer clients"


# `learning-rate = ""` picks the method's own rate. PEFT methods and full fine-tuning want very
# different rates (FedPETuning swept 5e-5..1e-2 per method). These are the winners of the sweep
# in simulation/presets/sweep.toml on the default data (README, "Learning rates"); ffa-lora and
# federa-ffa were not swept yet and take their unfrozen counterparts' rate.
METHOD_LEARNING_RATES = {
    "federa": 0.005,
    "lora": 0.005,
    "fft": 0.0001,
    "bitfit": 0.002,
    "adapter": 0.002,
    "ffa-lora": 0.005,
    "federa-ffa": 0.005,
}

# Strategy parameters: "" means Flower's own default for the chosen strategy.
STRATEGY_PARAMS = {
    "server-learning-rate": float,
    "server-momentum": float,
    "proximal-mu": float,
    "eta": float,
    "eta-l": float,
    "beta-1": float,
    "beta-2": float,
    "tau": float,
    "beta": float,
    "num-malicious-nodes": int,
    "num-nodes-to-select": int,
    "q": float,
    "client-learning-rate": float,
}
# Each parameter's valid range: (lower-bound test, exclusive upper bound, how it reads).
STRATEGY_PARAM_RANGES: dict[str, tuple[Callable[[float], bool], float, str]] = {
    "server-learning-rate": (lambda v: v > 0, math.inf, "must be > 0"),
    "server-momentum": (lambda v: v >= 0, 1.0, "in [0, 1)"),
    "proximal-mu": (lambda v: v >= 0, math.inf, "must be >= 0"),
    "eta": (lambda v: v > 0, math.inf, "must be > 0"),
    "eta-l": (lambda v: v > 0, math.inf, "must be > 0"),
    "beta-1": (lambda v: v >= 0, 1.0, "in [0, 1)"),
    "beta-2": (lambda v: v >= 0, 1.0, "in [0, 1)"),
    "tau": (lambda v: v > 0, math.inf, "must be > 0"),
    "beta": (lambda v: v >= 0, 0.5, "in [0, 0.5) (the fraction trimmed from each end)"),
    "num-malicious-nodes": (lambda v: v >= 0, math.inf, "must be >= 0"),
    "num-nodes-to-select": (lambda v: v >= 1, math.inf, "must be >= 1"),
    "q": (lambda v: v >= 0, math.inf, "must be >= 0"),
    "client-learning-rate": (lambda v: v > 0, math.inf, "must be > 0"),
}

DEFAULTS: dict[str, Any] = {
    "method": "federa",
    "model": "minilm-l6",
    "dataset": "rotten-tomatoes",
    "num-server-rounds": 8,
    "strategy": "fedavg",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "classes-per-client": 2,
    "test-fraction": 0.2,
    "lora-rank": 8,
    "lora-alpha": 16,
    "lora-dropout": 0.0,
    "adapter-size": 64,
    "target-modules": "",
    "svd": "full",
    "svd-niter": 4,
    "local-steps": 10,
    "local-epochs": 0,
    "batch-size": 16,
    "eval-batch-size": 64,
    "learning-rate": "",
    "weight-decay": 0.0,
    "max-grad-norm": 1.0,
    "lr-schedule": "constant",
    "warmup-ratio": 0.0,
    "max-length": 64,
    "precision": "fp32",
    "fraction-train": 1.0,
    "min-train-nodes": 2,
    "min-available-nodes": 2,
    "num-threads": 0,
    "seed": 42,
    "output-dir": "",
    "run-name": "",
    "wire-log": False,
    "eval-max-examples": 0,
    "target-accuracy": 0.0,
    "device-slowdown": 1.0,
    "uplink-mbps": 10.0,
    "downlink-mbps": 50.0,
    "max-update-norm": 0.0,
    "resume-from": "",
    "dp": "none",
    "dp-noise-multiplier": 1.0,
    "dp-clipping-norm": 1.0,
    "secagg": False,
    **{key: "" for key in STRATEGY_PARAMS},
}


@dataclass(frozen=True)
class RunConfig:
    """The validated run config; field names are the kebab-case keys with underscores."""

    method: str
    model: str
    dataset: str
    num_server_rounds: int
    strategy: str
    partitioner: str
    dirichlet_alpha: float
    classes_per_client: int
    test_fraction: float
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    adapter_size: int
    target_modules: tuple[str, ...]
    svd: str
    svd_niter: int
    local_steps: int
    local_epochs: int
    batch_size: int
    eval_batch_size: int
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    lr_schedule: str
    warmup_ratio: float
    max_length: int
    precision: str
    fraction_train: float
    min_train_nodes: int
    min_available_nodes: int
    num_threads: int
    seed: int
    output_dir: str
    run_name: str
    wire_log: bool
    eval_max_examples: int
    target_accuracy: float
    device_slowdown: float
    uplink_mbps: float
    downlink_mbps: float
    max_update_norm: float
    resume_from: str
    dp: str
    dp_noise_multiplier: float
    dp_clipping_norm: float
    secagg: bool
    strategy_params: dict[str, float | int]

    @property
    def uses_lora(self) -> bool:
        """True for the methods built on a peft LoRA adapter."""
        return self.method in ("federa", "lora", "ffa-lora", "federa-ffa")

    @property
    def uses_svd_init(self) -> bool:
        """True for the methods whose adapter starts from the server's SVD factors."""
        return self.method in ("federa", "federa-ffa")

    def to_dict(self) -> dict[str, Any]:
        """The config as kebab-case keys, JSON-ready (strategy parameters flattened)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "strategy_params":
                out.update(value)
            elif f.name == "target_modules":
                out["target-modules"] = ",".join(value)
            else:
                out[f.name.replace("_", "-")] = value
        return out


def _show(value: Any) -> str:
    """repr(value) for a message; Python refuses to print ints of over 4300 digits."""
    try:
        return repr(value)
    except (ValueError, RecursionError):
        size = f"{value.bit_length()}-bit " if isinstance(value, int) else ""
        return f"<{size}{type(value).__name__} too large to show>"


def _typed(key: str, value: Any, kind: type) -> Any:
    """Coerce one value to `kind` (ints are fine where floats are wanted); else ConfigError."""
    typed = value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        typed = float(value) if abs(value) <= sys.float_info.max else math.inf
    elif kind is int and isinstance(value, float) and value.is_integer():
        typed = int(value)
    if not isinstance(typed, kind) or (kind is not bool and isinstance(typed, bool)):
        default = DEFAULTS[key]
        hint = '"" = the default' if default == "" else f"default {default!r}"
        raise ConfigError(f"run-config {key}={_show(value)} must be a {kind.__name__} ({hint})")
    if kind is float and not math.isfinite(typed):
        raise ConfigError(f"run-config {key}={_show(value)} is invalid: must be a finite number")
    if kind is int and not -(2**63) <= typed < 2**63:
        raise ConfigError(f"run-config {key}={_show(value)} is invalid: TOML integers are 64-bit")
    return typed


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"run-config {key}={_show(value)} is invalid: {valid}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "valid choices are " + ", ".join(choices))


def parse_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Validate a Flower run config (defaults merged with overrides) into a RunConfig."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown run-config key {unknown[0]!r}; valid keys are " + ", ".join(DEFAULTS)
        )
    merged = {**DEFAULTS, **run_config}
    values: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        if key in STRATEGY_PARAMS or key == "learning-rate":
            continue
        values[key] = _typed(key, merged[key], type(default))

    _choice("method", values["method"], METHODS)
    lr = merged["learning-rate"]
    values["learning-rate"] = (
        METHOD_LEARNING_RATES[values["method"]] if lr == "" else _typed("learning-rate", lr, float)
    )
    _choice("strategy", values["strategy"], STRATEGIES)
    _choice("svd", values["svd"], SVD_MODES)
    _choice("lr-schedule", values["lr-schedule"], LR_SCHEDULES)
    _choice("dp", values["dp"], DP_MODES)
    _choice("precision", values["precision"], PRECISIONS)
    _check(
        not values["secagg"],
        "secagg",
        values["secagg"],
        SECAGG_UNAVAILABLE,
    )
    part = values["partitioner"]
    _check(
        part in PARTITIONER_CHOICES[:-1] or (part.startswith("column:") and len(part) > 7),
        "partitioner",
        part,
        "valid choices are " + PARTITIONER_HELP,
    )
    for key in (
        "num-server-rounds",
        "lora-rank",
        "batch-size",
        "eval-batch-size",
        "max-length",
        "classes-per-client",
        "svd-niter",
        "adapter-size",
    ):
        _check(values[key] >= 1, key, values[key], "must be >= 1")
    for key in (
        "local-epochs",
        "num-threads",
        "min-train-nodes",
        "min-available-nodes",
        "eval-max-examples",
    ):
        _check(values[key] >= 0, key, values[key], "must be >= 0")
    # numpy's generators refuse negative seeds, torch.manual_seed those of 64 bits and more
    _check(0 <= values["seed"] < 2**32, "seed", values["seed"], "in [0, 4294967295]")
    _check(
        values["local-steps"] >= 1 or values["local-epochs"] >= 1,
        "local-steps",
        values["local-steps"],
        "must be >= 1 unless local-epochs >= 1",
    )
    for key in (
        "dirichlet-alpha",
        "lora-alpha",
        "learning-rate",
        "device-slowdown",
        "uplink-mbps",
        "downlink-mbps",
        "dp-clipping-norm",
    ):
        _check(values[key] > 0, key, values[key], "must be > 0")
    _check(
        values["dp-noise-multiplier"] >= 0,
        "dp-noise-multiplier",
        values["dp-noise-multiplier"],
        "must be >= 0",
    )
    for key in ("weight-decay", "max-grad-norm", "max-update-norm"):
        _check(values[key] >= 0, key, values[key], "must be >= 0 (0 disables it)")
    _check(0 < values["test-fraction"] < 1, "test-fraction", values["test-fraction"], "in (0, 1)")
    _check(
        0 < values["fraction-train"] <= 1, "fraction-train", values["fraction-train"], "in (0, 1]"
    )
    _check(0 <= values["lora-dropout"] < 1, "lora-dropout", values["lora-dropout"], "in [0, 1)")
    _check(
        0 <= values["target-accuracy"] <= 1,
        "target-accuracy",
        values["target-accuracy"],
        "in [0, 1] (0 = no target)",
    )
    _check(0 <= values["warmup-ratio"] < 1, "warmup-ratio", values["warmup-ratio"], "in [0, 1)")
    _check(
        re.fullmatch(r"[A-Za-z0-9._-]*", values["run-name"]) is not None,
        "run-name",
        values["run-name"],
        "use letters, digits, '.', '_' and '-' only",
    )

    strategy_params: dict[str, float | int] = {}
    for key, kind in STRATEGY_PARAMS.items():
        value = merged[key]
        if value == "":
            continue
        value = _typed(key, value, kind)
        low, high, valid = STRATEGY_PARAM_RANGES[key]
        _check(low(value) and value < high, key, value, valid + ' (or "" for the default)')
        strategy_params[key] = value

    targets = tuple(t.strip() for t in values["target-modules"].split(",") if t.strip())
    return RunConfig(
        **{k.replace("-", "_"): v for k, v in values.items() if k != "target-modules"},
        target_modules=targets,
        strategy_params=strategy_params,
    )


# flwr's own `--run-config` parser rejects unquoted strings (method=lora); people type them.
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse "k=v k2=v2" like `flwr run --run-config`, also accepting unquoted strings."""
    import tomllib

    out: dict[str, Any] = {}
    rest = _PAIR.sub("", text).strip()
    if rest:
        raise ConfigError(f"cannot parse run-config {rest!r}: use space-separated key=value pairs")
    for key, raw in _PAIR.findall(text):
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except (ValueError, RecursionError):  # TOMLDecodeError; ints over 4300 digits; deep [[[
            out[key] = raw
    return out


def _toml_string(text: str) -> str:
    """A TOML basic string with no `"` inside (flwr's own pattern ends a value at the next `"`):
    printable ASCII stays, everything else (quotes, backslashes, controls, non-ASCII) is \\u/\\U."""
    out = []
    for ch in text:
        if " " <= ch <= "~" and ch not in '"\\':
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def to_flwr_overrides(values: dict[str, Any]) -> str:
    """Render overrides as the TOML-valued `k=v` string `flwr run --run-config` accepts."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value!r}")
        else:
            parts.append(f"{key}={_toml_string(str(value))}")
    return " ".join(parts)


def default_app_dir() -> Path:
    """The Flower app to run: this source tree (where pyproject.toml declares the app)."""
    return Path(__file__).resolve().parent.parent


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's `[tool.flwr.app.config]` defaults, as `flwr run` will merge them."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"no Flower app at {app_dir}: pyproject.toml not found")
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


@dataclass(frozen=True)
class Partitioning:
    """How the training split is dealt among clients: the partitioner spec and its settings."""

    spec: str  # one of PARTITIONER_CHOICES
    num_partitions: int
    seed: int
    dirichlet_alpha: float
    classes_per_client: int

    @classmethod
    def of(cls, cfg: RunConfig, num_partitions: int) -> Partitioning:
        """A run's partitioning among `num_partitions` clients."""
        return cls(
            cfg.partitioner, num_partitions, cfg.seed, cfg.dirichlet_alpha, cfg.classes_per_client
        )
