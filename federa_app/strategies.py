"""Build one of Flower's own strategies (`flwr.serverapp.strategy`) from the run config."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from federa_app.config import STRATEGY_PARAMS, RunConfig
from federa_app.errors import ConfigError
from federa_app.svd_avg import SvdAvg


class KeepsDtypes:
    """Mixin: the aggregate has the dtypes the round sent, whatever the strategy's arithmetic.

    Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) returns float64 for a float32 model:
    its bias-corrected rate is a NumPy float64, which promotes the update. Every node then gets
    float64 tensors and its float32 reply fails validation, so no later round counts.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent_dtypes = {name: array.numpy().dtype for name, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        sent = getattr(self, "_sent_dtypes", {})
        if arrays is not None and any(arrays[k].numpy().dtype != sent.get(k) for k in sent):
            arrays = ArrayRecord(
                {k: Array(np.asarray(a.numpy(), dtype=sent.get(k))) for k, a in arrays.items()}
            )
        return arrays, metrics


class FedAdam(KeepsDtypes, flwr_strategy.FedAdam):
    """Flower's FedAdam, returning the model's own dtypes."""


class FedYogi(KeepsDtypes, flwr_strategy.FedYogi):
    """Flower's FedYogi, returning the model's own dtypes."""


class FedAdagrad(KeepsDtypes, flwr_strategy.FedAdagrad):
    """Flower's FedAdagrad, returning the model's own dtypes."""


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
    "multikrum": flwr_strategy.MultiKrum,
    "bulyan": flwr_strategy.Bulyan,
    "qfedavg": flwr_strategy.QFedAvg,
    "svd-avg": SvdAvg,
}
# svd-avg averages the LoRA product B @ A, so both factors must be on the wire.
SVD_AVG_METHODS = ("federa", "lora")

# Server-side settings of ours where Flower's defaults do not learn with these models, per
# method family; from the strategy sweep (simulation/presets/strategy-sweep.toml, results in
# docs/results/strategies/). A run-config value always wins; keys not listed keep Flower's.
OUR_DEFAULTS: dict[str, dict[str, dict[str, float]]] = {
    "adapters": {},
    "fft": {},
}
OUR_DEFAULTS_SOURCE = "federa default for {family} (docs/results/strategies)"
# Byzantine-robust rules: the replies a round needs for f = num-malicious-nodes, and why.
ROBUST_MIN_REPLIES = {
    "krum": (lambda f: 2 * f + 3, "2f+3: Krum scores each update by its n-f-2 nearest"),
    "multikrum": (lambda f: 2 * f + 3, "2f+3: Krum scores each update by its n-f-2 nearest"),
    "bulyan": (lambda f: 4 * f + 3, "4f+3: Bulyan's rule; Flower skips the round otherwise"),
}


def method_family(method: str) -> str:
    """`fft` trains every weight; every other method a small set (adapters, biases, the head)."""
    return "fft" if method == "fft" else "adapters"


def own_parameters(name: str) -> list[str]:
    """The run-config keys of the strategy's own parameters (those beyond FedAvg's)."""
    params = inspect.signature(STRATEGY_CLASSES[name].__init__).parameters
    return [key for key in STRATEGY_PARAMS if key.replace("-", "_") in params]


def resolved_parameters(cfg: RunConfig) -> tuple[dict[str, float | int], dict[str, str]]:
    """The strategy's own parameters that are not Flower's defaults, and where each came from.

    An explicit run-config value wins; then ours for the method's family; else Flower's default
    (left out of the first dict). QFedAvg has no default client-learning-rate: the clients' own.
    """
    allowed = own_parameters(cfg.strategy)
    for key in cfg.strategy_params:
        if key not in allowed:
            raise ConfigError(
                f"run-config {key} does not apply to strategy {cfg.strategy!r}; its own "
                f"parameters are: {', '.join(allowed) or 'none'}"
            )
    family = method_family(cfg.method)
    ours = OUR_DEFAULTS[family].get(cfg.strategy, {})
    values: dict[str, float | int] = {}
    sources: dict[str, str] = {}
    for key in allowed:
        if key in cfg.strategy_params:
            values[key], sources[key] = cfg.strategy_params[key], "run-config"
        elif key in ours:
            values[key], sources[key] = ours[key], OUR_DEFAULTS_SOURCE.format(family=family)
        elif cfg.strategy == "qfedavg" and key == "client-learning-rate":
            values[key], sources[key] = cfg.learning_rate, "the clients' learning-rate"
        else:
            sources[key] = "flower default"
    return values, sources


def check_node_count(cfg: RunConfig, num_nodes: int, num_sampled: int) -> None:
    """A robust strategy's num-malicious-nodes (and num-nodes-to-select) against the nodes a
    round samples; raises a one-line ConfigError naming the value, the bound and the counts."""
    if cfg.strategy not in ROBUST_MIN_REPLIES:
        return
    values, _ = resolved_parameters(cfg)
    f = int(values.get("num-malicious-nodes", 0))
    needed, rule = ROBUST_MIN_REPLIES[cfg.strategy]
    if num_sampled < needed(f):
        raise ConfigError(
            f"strategy {cfg.strategy} with num-malicious-nodes={f} needs at least {needed(f)} "
            f"nodes per round ({rule}); {num_sampled} of {num_nodes} nodes are sampled: lower "
            "num-malicious-nodes or use more nodes (fraction-train, min-train-nodes)"
        )
    select = int(values.get("num-nodes-to-select", 1))
    if cfg.strategy == "multikrum" and select > num_sampled - f:
        raise ConfigError(
            f"strategy multikrum with num-nodes-to-select={select} can select at most "
            f"{num_sampled - f} of the {num_sampled} nodes sampled per round "
            f"(n - num-malicious-nodes, num-malicious-nodes={f})"
        )


def refusal(strategy: str, method: str) -> str | None:
    """Why this strategy cannot aggregate this method's updates (one line), or None."""
    if strategy == "svd-avg" and method not in SVD_AVG_METHODS:
        return (
            f"strategy svd-avg aggregates the LoRA product B @ A and works with method "
            f"{' or '.join(SVD_AVG_METHODS)}, not {method!r}: use fedavg for it"
        )
    return None


def build_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy with its resolved parameters (`resolved_parameters`).

    Client-side (federated) evaluation is off: the server evaluates the global model itself.
    """
    values, _ = resolved_parameters(cfg)
    kwargs = {key.replace("-", "_"): value for key, value in values.items()}
    reason = refusal(cfg.strategy, cfg.method)
    if reason:
        raise ConfigError(reason)
    if cfg.strategy == "svd-avg":
        kwargs["rank"] = cfg.lora_rank
    return STRATEGY_CLASSES[cfg.strategy](
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_available_nodes,
        **kwargs,
    )


def strategy_settings(strategy: Strategy, name: str) -> dict[str, float | int]:
    """The values the strategy actually uses for its own parameters (recorded in config.json)."""
    return {key: getattr(strategy, key.replace("-", "_")) for key in own_parameters(name)}
