"""Build one of Flower's own strategies (`flwr.serverapp.strategy`, or `svd-avg`) from the run
config: each strategy's parameters resolved (run config, else ours where Flower's defaults do not
learn with a pre-trained model, else Flower's), checked against the node count, and the
aggregate kept in the model's dtypes."""

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
from federa_app.federation.svd_avg import SvdAvg


class KeepsDtypes:
    """Mixin: the aggregate has the dtypes the round sent, whatever the strategy's arithmetic.

    Flower's FedAdam, FedYogi, FedAdagrad and QFedAvg return float64 for a float32 model: a NumPy
    float64 scalar (the bias-corrected rate, loss**q) promotes the update. Every node then gets
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


class FedYogi(flwr_strategy.FedYogi):
    """Flower's FedYogi with the bias correction Flower's FedAdam applies and its FedYogi lacks.

    Without it the step on a direction the clients keep pushing grows to about twice eta by
    round 5-30 (m_t rises towards the update while Yogi's v_t grows only additively): FeDeRA on
    Dirichlet 0.5 data then overshoots round after round (update norm 10 -> 34 over 10 rounds,
    accuracy swinging between 0.57 and 0.72) where FedAdam at the same eta learns.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        eta = self.eta
        # FedAdam's eta_norm (Kingma & Ba's alpha_t), exponents as Flower's FedAdam has them.
        self.eta = eta * float(
            np.sqrt(1 - self.beta_2 ** (server_round + 1.0))
            / (1 - self.beta_1 ** (server_round + 1.0))
        )
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.eta = eta


FLOWER_STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": FedYogi,  # bias-corrected, as FedAdam
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
    "multikrum": flwr_strategy.MultiKrum,
    "bulyan": flwr_strategy.Bulyan,
    "qfedavg": flwr_strategy.QFedAvg,
    "svd-avg": SvdAvg,
}
# Each with the model's dtypes kept (KeepsDtypes), under Flower's own class name.
STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    name: type(cls.__name__, (KeepsDtypes, cls), {"__doc__": cls.__doc__, "__module__": __name__})
    for name, cls in FLOWER_STRATEGIES.items()
}
# svd-avg averages the LoRA product B @ A, so both factors must be on the wire.
SVD_AVG_METHODS = ("federa", "lora")

# Our defaults where Flower's do not learn with a pre-trained model (docs/results/strategies:
# the sweep behind them). A run-config value always wins; keys not listed keep Flower's.
#
# The server optimisers (FedAdam, FedYogi, FedAdagrad) move every element by about eta per
# round, whatever the size of the clients' update, and their tau sets where that sign-like step
# turns into a step proportional to the update. Flower's absolute eta=0.1/0.01, tau=1e-3 suit
# neither adapters (clients move an element by up to learning-rate x local-steps = 0.05) nor
# full fine-tuning (1e-3). So ours are relative: eta and tau are multiples of the clients' own
# movement per round, u = learning-rate x local-steps, and the server's update keeps its size
# relative to FedAvg's whatever the method, model or learning rate.
RELATIVE_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 0.6, "tau": 0.02},
    "fedyogi": {"eta": 0.6, "tau": 0.02},
    "fedadagrad": {"eta": 0.2, "tau": 0.02},  # no momentum: its first step is the full eta
}
# q-FedAvg's client-learning-rate is its Lipschitz estimate L = 1/client-learning-rate: the
# update shrinks by 1 / (1 + q L ||w - w_k||^2 / F_k); with Adam on the nodes (not q-FFL's plain
# SGD) the clients' rate is no estimate of 1/L, and shrinks the update to nothing.
ABSOLUTE_DEFAULTS: dict[str, dict[str, float]] = {
    "qfedavg": {"client-learning-rate": 100.0},
}
DEFAULTS_SOURCE = "federa default (docs/results/strategies)"
# Byzantine-robust rules: the replies a round needs for f = num-malicious-nodes, and why.
ROBUST_MIN_REPLIES = {
    "krum": (lambda f: 2 * f + 3, "2f+3: Krum scores each update by its n-f-2 nearest"),
    "multikrum": (lambda f: 2 * f + 3, "2f+3: Krum scores each update by its n-f-2 nearest"),
    "bulyan": (lambda f: 4 * f + 3, "4f+3: Bulyan's rule; Flower skips the round otherwise"),
}


def own_parameters(name: str) -> list[str]:
    """The run-config keys of the strategy's own parameters (those beyond FedAvg's)."""
    params = inspect.signature(STRATEGY_CLASSES[name].__init__).parameters
    return [key for key in STRATEGY_PARAMS if key.replace("-", "_") in params]


def client_movement(cfg: RunConfig) -> float:
    """u = learning-rate x local-steps: how far a node's optimiser can move an element per round
    (Adam's step is about the learning rate); the unit of the server optimisers' defaults.
    With local-epochs the steps depend on each node's data, unknown here: set eta and tau."""
    return cfg.learning_rate * cfg.local_steps


def resolved_parameters(cfg: RunConfig) -> tuple[dict[str, float | int], dict[str, str]]:
    """The strategy's own parameters that are not Flower's defaults, and where each came from.

    An explicit run-config value wins; then ours (RELATIVE_DEFAULTS x u, ABSOLUTE_DEFAULTS);
    else Flower's default (left out of the first dict).
    """
    allowed = own_parameters(cfg.strategy)
    for key in cfg.strategy_params:
        if key not in allowed:
            raise ConfigError(
                f"run-config {key} does not apply to strategy {cfg.strategy!r}; its own "
                f"parameters are: {', '.join(allowed) or 'none'}"
            )
    relative = RELATIVE_DEFAULTS.get(cfg.strategy, {})
    absolute = ABSOLUTE_DEFAULTS.get(cfg.strategy, {})
    values: dict[str, float | int] = {}
    sources: dict[str, str] = {}
    for key in allowed:
        if key in cfg.strategy_params:
            values[key], sources[key] = cfg.strategy_params[key], "run-config"
        elif key in relative:
            values[key] = relative[key] * client_movement(cfg)
            sources[key] = f"{DEFAULTS_SOURCE}: {relative[key]:g} x learning-rate x local-steps"
        elif key in absolute:
            values[key], sources[key] = absolute[key], DEFAULTS_SOURCE
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
