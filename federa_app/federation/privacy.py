"""Differential privacy: run-config `dp` mapped onto Flower's own DP strategy wrappers and mods.

Server-side modes clip each reply's update on the server; client-side modes clip on the node
(`dp_client_mod`) and the server only adds the Gaussian noise. Adaptive modes rescale the norm
each round by exp(-0.2 * (clipped fraction - 0.5)), Flower 1.42's rule: its sign is the opposite
of Andrew et al. (2019), so the norm drifts away from the update norms instead of tracking them.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from federa_app.config import RunConfig, parse_run_config
from federa_app.errors import ConfigError
from federa_app.federation.wire import INIT_FACTORS_KEY

FIXED_WRAPPERS = {
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
}
ADAPTIVE_WRAPPERS = {
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
}
# The wrapper class a strategy was built with tells which mode it runs (for the summary).
MODE_OF_WRAPPER = {cls: mode for mode, cls in {**FIXED_WRAPPERS, **ADAPTIVE_WRAPPERS}.items()}
CLIENT_MODS = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}


def sampled_per_round(cfg: RunConfig, num_nodes: int) -> int:
    """Nodes FedAvg.configure_train samples per round from `num_nodes` (as Flower computes it)."""
    return max(int(num_nodes * cfg.fraction_train), cfg.min_train_nodes)


def with_dp(strategy: Strategy, cfg: RunConfig, num_sampled: int) -> Strategy:
    """`strategy` wrapped in the Flower DP wrapper `cfg.dp` names; unchanged for dp=none.

    `num_sampled` must be the per-round sample size: Flower divides the noise by it.
    """
    if cfg.dp == "none":
        return strategy
    if num_sampled < 1:
        raise ConfigError(
            f"dp={cfg.dp} needs at least one node sampled per round, got {num_sampled} "
            "(raise fraction-train or min-train-nodes)"
        )
    if cfg.dp in FIXED_WRAPPERS:
        return FIXED_WRAPPERS[cfg.dp](
            strategy,
            noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_clipping_norm,
            num_sampled_clients=num_sampled,
        )
    try:
        return ADAPTIVE_WRAPPERS[cfg.dp](
            strategy,
            noise_multiplier=cfg.dp_noise_multiplier,
            num_sampled_clients=num_sampled,
            initial_clipping_norm=cfg.dp_clipping_norm,
        )
    except ValueError as err:  # Flower's clipped-count noise (num_sampled/20) caps the multiplier
        raise ConfigError(
            f"dp={cfg.dp} with dp-noise-multiplier={cfg.dp_noise_multiplier} and {num_sampled} "
            f"nodes per round: Flower's adaptive clipping needs dp-noise-multiplier < "
            f"{num_sampled / 10:g} (= nodes/10); lower it, sample more nodes or use a fixed "
            f"mode ({err})"
        ) from err


def dp_settings(strategy: Strategy, cfg: RunConfig) -> dict[str, Any]:
    """What the run summary records about DP; {"dp": "none"} for a strategy without a wrapper.

    The final clipping norm differs from the configured one only in the adaptive modes; the
    update noise multiplier there is Flower's effective one (raised to pay for the count noise).
    """
    mode = MODE_OF_WRAPPER.get(type(strategy))
    if mode is None:
        return {"dp": "none"}
    out: dict[str, Any] = {
        "dp": mode,
        "dp_noise_multiplier": cfg.dp_noise_multiplier,
        "dp_clipping_norm": cfg.dp_clipping_norm,
        "dp_final_clipping_norm": float(strategy.clipping_norm),
        "dp_update_noise_multiplier": float(strategy.noise_multiplier),
        "dp_num_sampled_clients": strategy.num_sampled_clients,
    }
    if mode in ADAPTIVE_WRAPPERS:
        out["dp_clipped_count_stddev"] = float(strategy.clipped_count_stddev)
        out["dp_target_clipped_quantile"] = strategy.target_clipped_quantile
        out["dp_clip_norm_lr"] = strategy.clip_norm_lr
    return out


def dp_reply_metric_keys(cfg: RunConfig) -> tuple[str, ...]:
    """Metric keys the DP mod adds to a train reply: Flower's clipped bit for client-adaptive."""
    return (KEY_NORM_BIT,) if cfg.dp == "client-adaptive" else ()


def dp_client_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: for dp=client-* clip the train reply's update with Flower's own mod.

    Flower's mods want exactly one ArrayRecord in the message, so FeDeRA's initial factors
    (a second one, sent once per node) move to `context.state` first, where the client reads them.
    """
    mod = CLIENT_MODS.get(parse_run_config(context.run_config).dp)
    if mod is None or msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    if INIT_FACTORS_KEY in msg.content:
        context.state[INIT_FACTORS_KEY] = msg.content.pop(INIT_FACTORS_KEY)
    return mod(msg, context, call_next)
