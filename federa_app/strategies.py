"""Build one of Flower's own strategies (`flwr.serverapp.strategy`) from the run config."""

from __future__ import annotations

import inspect

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from federa_app.config import STRATEGY_PARAMS, RunConfig
from federa_app.errors import ConfigError
from federa_app.svd_avg import SvdAvg

STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
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


def own_parameters(name: str) -> list[str]:
    """The run-config keys of the strategy's own parameters (those beyond FedAvg's)."""
    params = inspect.signature(STRATEGY_CLASSES[name].__init__).parameters
    return [key for key in STRATEGY_PARAMS if key.replace("-", "_") in params]


def build_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy; parameters left at "" keep Flower's defaults.

    Client-side (federated) evaluation is off: the server evaluates the global model itself.
    """
    allowed = own_parameters(cfg.strategy)
    for key in cfg.strategy_params:
        if key not in allowed:
            raise ConfigError(
                f"run-config {key} does not apply to strategy {cfg.strategy!r}; its own "
                f"parameters are: {', '.join(allowed) or 'none'}"
            )
    kwargs = {key.replace("-", "_"): value for key, value in cfg.strategy_params.items()}
    if cfg.strategy == "qfedavg":  # QFedAvg has no default for it: the clients' own rate
        kwargs.setdefault("client_learning_rate", cfg.learning_rate)
    if cfg.strategy == "svd-avg":
        if cfg.method not in SVD_AVG_METHODS:
            raise ConfigError(
                f"strategy svd-avg aggregates the LoRA product B @ A and works with method "
                f"{' or '.join(SVD_AVG_METHODS)}, not {cfg.method!r}: use fedavg for it"
            )
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
