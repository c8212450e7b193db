"""Checkpoint after every round and resume after the last one.

`checkpoint.pt` in the run directory holds everything round k+1 depends on: the global arrays
(and round k-1's, for the update metrics), the strategy's own state (FedAdam/FedYogi/FedAdagrad
moments, FedAvgM momentum, an adaptive DP clipping norm), the random generators' states (Flower
samples nodes with `random`, DP noise comes from `np.random`), the metrics rows so far and
FeDeRA's initial factors. It is written to a temp file and renamed, so a kill at any moment leaves
either the previous checkpoint or the new one. torch.save/torch.load(weights_only=True) because
it stores tensors without pickling code; numpy arrays are carried as tensors.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from federa_app.config import DEFAULTS, RunConfig
from federa_app.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1
# Attributes of Flower's strategies (and their DP wrappers) that change from round to round.
STRATEGY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector", "clipping_norm")
# Keys a resumed run may change: they steer the remaining rounds' length, logging and the
# edge time model, not what was trained so far. Everything else must equal the original run.
CHANGEABLE_ON_RESUME = (
    "num-server-rounds",
    "num-threads",
    "wire-log",
    "eval-batch-size",
    "target-accuracy",
    "device-slowdown",
    "uplink-mbps",
    "downlink-mbps",
    "output-dir",
    "run-name",
    "resume-from",
)


@dataclass
class Checkpoint:
    """The state after round `round` (0 = before any training)."""

    round: int
    arrays: dict[str, torch.Tensor]
    previous_arrays: dict[str, torch.Tensor] | None
    strategy_state: list[dict[str, Any]]  # one entry per strategy level (DP wrapper first)
    rng: dict[str, Any]
    rows: list[dict[str, Any]]
    factors: dict[str, torch.Tensor] | None
    config: dict[str, Any]
    wall_seconds: float
    svd_seconds: float
    resumed_after: list[int] = field(default_factory=list)  # rounds after which it was resumed
    format: int = FORMAT


def save(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write the checkpoint atomically (temp file + rename)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(asdict(checkpoint), tmp)
    os.replace(tmp, path)


def require(run_dir: Path) -> Path:
    """The checkpoint file of `run_dir`; a one-line ConfigError when there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"resume-from {run_dir}: no {CHECKPOINT_FILE} there (not a run directory, or a run "
            "started before checkpoints existed)"
        )
    return path


def load(run_dir: Path) -> Checkpoint:
    """Read a run directory's checkpoint; a one-line ConfigError when there is none."""
    path = require(run_dir)
    data = torch.load(path, weights_only=True, mmap=True)
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path}: checkpoint format {data.get('format')!r}, expected {FORMAT}")
    return Checkpoint(**data)


def check_resumable(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """One-line ConfigError if `cfg` changes what the checkpointed run trained, or has no rounds
    left; the run's other keys may change (CHANGEABLE_ON_RESUME)."""
    new = cfg.to_dict()
    # A key added after the run was checkpointed: the run had its default (e.g. precision=fp32).
    old = {key: checkpoint.config.get(key, default) for key, default in DEFAULTS.items()}
    differ = [
        f"{key}={new.get(key, '')!r} (run: {old[key]!r})"
        for key in DEFAULTS
        if key not in CHANGEABLE_ON_RESUME and new.get(key, "") != old[key]
    ]
    if differ:
        raise ConfigError(
            "resume-from: the run config differs from the checkpointed run's in "
            + ", ".join(differ)
            + "; only these may change: "
            + ", ".join(CHANGEABLE_ON_RESUME)
        )
    if checkpoint.round >= cfg.num_server_rounds:
        raise ConfigError(
            f"resume-from: the run already completed round {checkpoint.round} of "
            f"num-server-rounds={cfg.num_server_rounds}: pass a larger num-server-rounds to go on"
        )


def strategy_levels(strategy: Strategy) -> list[Strategy]:
    """The strategy and the ones it wraps (Flower's DP wrappers keep theirs in `.strategy`)."""
    levels = [strategy]
    while isinstance(getattr(levels[-1], "strategy", None), Strategy):
        levels.append(levels[-1].strategy)
    return levels


def strategy_state(strategy: Strategy) -> list[dict[str, Any]]:
    """The round-to-round state of every strategy level, as tensors and plain values."""
    return [
        {name: _encode(getattr(level, name)) for name in STRATEGY_STATE if hasattr(level, name)}
        for level in strategy_levels(strategy)
    ]


def restore_strategy_state(strategy: Strategy, state: list[dict[str, Any]]) -> None:
    """Put saved state back into a freshly built strategy of the same configuration."""
    levels = strategy_levels(strategy)
    if len(levels) != len(state):
        raise ConfigError("resume-from: the checkpoint's strategy has a different structure")
    for level, saved in zip(levels, state, strict=True):
        for name, value in saved.items():
            setattr(level, name, _decode(value))


def rng_state() -> dict[str, Any]:
    """The generators the server draws from: Python's (node sampling), numpy's, torch's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Continue every generator where the checkpointed run left it."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def _encode(value: Any) -> dict[str, Any]:
    """A strategy attribute as tensors, tagged with its kind (ArrayRecord, dict or list)."""
    if isinstance(value, ArrayRecord):
        return {"kind": "ArrayRecord", "value": {k: _tensor(a.numpy()) for k, a in value.items()}}
    if isinstance(value, dict):
        return {"kind": "dict", "value": {k: _tensor(a) for k, a in value.items()}}
    if isinstance(value, list):
        return {"kind": "list", "value": [_tensor(a) for a in value]}
    return {"kind": "plain", "value": value}


def _decode(encoded: dict[str, Any]) -> Any:
    kind, value = encoded["kind"], encoded["value"]
    if kind == "ArrayRecord":
        return ArrayRecord({k: Array(t.numpy()) for k, t in value.items()})
    if kind == "dict":
        return {k: t.numpy() for k, t in value.items()}
    if kind == "list":
        return [t.numpy() for t in value]
    return value
