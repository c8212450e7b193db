"""The run directory (DESIGN.md contract): config.json, metrics.jsonl, summary.json, adapter/, plot.

`summary.json` is written last and atomically: a directory without it is an unfinished run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from federa_app.config import RunConfig
from federa_app.data.assets import federa_home
from federa_app.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
ADAPTER_DIR = "adapter"
PLOT_FILE = "accuracy.png"
WIRE_FILE = "wire.jsonl"


def runs_root(output_dir: str) -> Path:
    """Where runs go: `output-dir` if absolute, else relative to $FEDERA_HOME (default runs/).

    The ServerApp runs from Flower's app cache, not the user's directory, so a relative path
    cannot mean "here".
    """
    path = Path(output_dir or "runs").expanduser()
    return path if path.is_absolute() else federa_home() / path


def default_run_name(cfg: RunConfig, run_id: int) -> str:
    """A sortable, readable name: time, method, dataset and Flower's run id."""
    dataset = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.dataset)[-40:]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{dataset}-{run_id}"


def _write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file and rename it into place, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    _write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class RunDirectory:
    """One run's directory; refuses to reuse a directory that already holds a run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig, run_id: int) -> RunDirectory:
        """Make the run directory; an existing non-empty one is an error, nothing is overwritten."""
        path = runs_root(cfg.output_dir) / (cfg.run_name or default_run_name(cfg, run_id))
        if path.exists() and any(path.iterdir()):
            raise ConfigError(
                f"run directory {path} already exists and is not empty: choose another "
                "run-name or output-dir"
            )
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def reopen(cls, path: Path, last_round: int, rows: list[dict[str, Any]]) -> RunDirectory:
        """A run directory to continue after `last_round`: its metrics.jsonl (and wire.jsonl)
        are cut back to what the checkpoint holds, as a run killed mid-round may have written
        more; a finished run's summary.json is kept under another name (`retire_summary`)."""
        run_dir = cls(path)
        retire_summary(run_dir.path)
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        _write_text_atomic(run_dir.path / METRICS_FILE, lines)
        wire = run_dir.path / WIRE_FILE
        if wire.exists():
            kept = [
                line
                for line in wire.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["round"] <= last_round
            ]
            _write_text_atomic(wire, "".join(kept))
        return run_dir

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.path / CONFIG_FILE, config)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / SUMMARY_FILE, summary)

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR


def retire_summary(run_dir: Path) -> None:
    """Rename a finished run's summary.json before the run is continued (`summary-2.json`...):
    kept, and a directory without summary.json reads as unfinished until the new one lands."""
    summary = Path(run_dir) / SUMMARY_FILE
    if summary.exists():
        os.replace(summary, unused_path(summary))


def unused_path(path: Path) -> Path:
    """`path`, or `name-2.ext`, `name-3.ext`... if taken (a resumed run keeps the first logs)."""
    candidate, n = Path(path), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (empty if none yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_accuracy(
    rows: list[dict[str, Any]], out_file: Path, title: str, majority_rate: float | None = None
) -> None:
    """Test accuracy and macro-F1 per round, with the majority-class rate for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r["accuracy"] for r in rows], marker="o", label="accuracy")
    ax.plot(rounds, [r["macro_f1"] for r in rows], marker="s", label="macro-F1")
    if majority_rate is not None:
        ax.axhline(majority_rate, color="grey", ls="--", label="majority class")
    ax.set_xlabel("round")
    ax.set_ylabel("server-side test score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=120)
    plt.close(fig)
