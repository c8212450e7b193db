"""`federa compare`: a grid of real Flower simulations and the paper-style tables and plots.

A grid is methods x datasets x partitions (Dirichlet alphas or "iid") x seeds x strategies, with
per-method learning rates and per-strategy parameter settings (a list sweeps them). Each cell
runs through `federa simulate`'s code path and writes a normal run directory named by the cell
and a hash of its resolved config, so a re-run skips finished cells and a changed setting makes
a new cell. Grids are TOML files; the presets live in simulation/presets/.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federa_app.config import (
    METHOD_LEARNING_RATES,
    METHODS,
    STRATEGIES,
    STRATEGY_PARAMS,
    app_defaults,
    default_app_dir,
    parse_run_config,
)
from federa_app.errors import ConfigError, RunFailed
from federa_app.federation.server import check_before_start
from federa_app.federation.strategies import refusal
from federa_app.records.edge import EdgeLink
from federa_app.records.run_dir import SUMMARY_FILE

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
GRID_KEYS = (
    "methods",
    "datasets",
    "partitions",
    "seeds",
    "strategies",
    "num-clients",
    "cpus-per-client",
)
TABLES = ("grid", "run-config", "learning-rate", "strategy-params", "target-accuracy")
# Keys that change what is reported about a run, not the run: left out of the cell key.
REPORTING_KEYS = (
    "output-dir",
    "run-name",
    "wire-log",
    "target-accuracy",
    "device-slowdown",
    "uplink-mbps",
    "downlink-mbps",
)
# Keys the grid sets per cell; a [run-config] table may not set them too.
CELL_KEYS = (
    "method",
    "dataset",
    "partitioner",
    "dirichlet-alpha",
    "seed",
    "learning-rate",
    "strategy",
)
# One setting of a strategy's own parameters: (key, value) pairs; () is the defaults.
Variant = tuple[tuple[str, float | int], ...]


def variant_label(variant: Variant) -> str:
    """How a strategy setting reads in labels and tables: "eta=0.01 tau=0.001"."""
    return " ".join(f"{k}={v:g}" for k, v in variant)


Log = Callable[[str], object]
# simulate(num_clients, overrides, output_dir, app_dir, cpus_per_client, log) -> run directory
RunCell = Callable[[int, dict[str, Any], Path, Path | None, int, Log], Path]


@dataclass(frozen=True)
class Cell:
    """One simulation of the grid."""

    method: str
    dataset: str
    partition: str  # "iid" or a Dirichlet alpha as text ("0.1")
    seed: int
    learning_rate: float
    overrides: dict[str, Any] = field(hash=False)
    key: str = ""
    strategy: str = "fedavg"
    variant: Variant = ()

    @property
    def strategy_label(self) -> str:
        """The strategy and its swept settings: "fedadam eta=0.01"; "fedavg" alone."""
        return f"{self.strategy} {variant_label(self.variant)}".strip()

    @property
    def name(self) -> str:
        dataset = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.dataset)[-30:]
        part = "iid" if self.partition == "iid" else f"a{self.partition}"
        # FedAvg cells keep the names they had before grids had strategies.
        tag = "" if self.strategy_label == "fedavg" else f"-{self.strategy}"
        tag += "".join(f"-{k}{v:g}" for k, v in self.variant)
        return (
            f"{self.method}-{dataset}-{part}-s{self.seed}-lr{self.learning_rate:g}{tag}-{self.key}"
        )


@dataclass
class Grid:
    """A parsed grid file: what to run and how to report it."""

    name: str
    methods: list[str]
    datasets: list[str]
    partitions: list[str]
    seeds: list[int]
    num_clients: int
    cpus_per_client: int
    run_config: dict[str, Any]
    learning_rates: dict[str, list[float]]
    targets: dict[str, float]
    strategies: list[str] = field(default_factory=lambda: ["fedavg"])
    strategy_params: dict[str, list[Variant]] = field(default_factory=dict)

    def link(self) -> EdgeLink:
        """The edge model the report uses (the grid's run-config values, else the defaults)."""
        cfg = parse_run_config(self.run_config)
        return EdgeLink(cfg.device_slowdown, cfg.uplink_mbps, cfg.downlink_mbps)


def partition_label(partition: str) -> str:
    """How a partition setting reads in tables: "IID" or "alpha=0.1"."""
    return "IID" if partition == "iid" else f"alpha={partition}"


def grid_path(spec: str) -> Path:
    """A preset name (smoke, quick, paper, sweep) or a path to a TOML grid file."""
    preset = PRESETS_DIR / f"{spec}.toml"
    if preset.is_file():
        return preset
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
    raise ConfigError(f"no grid {spec!r}: use a preset ({', '.join(names)}) or a TOML file path")


def _list(table: dict, key: str, kind: type, where: str) -> list:
    value = table.get(key)
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        kind_name = getattr(kind, "__name__", "number")
        raise ConfigError(f"{where} {key}={value!r} must be a non-empty list of {kind_name}")
    return values


def load_grid(spec: str) -> Grid:
    """Parse and check a grid file; every error is one line naming the bad value."""
    path = grid_path(spec)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"grid {path}: not valid TOML ({exc})") from None
    for table in doc:
        if table not in TABLES:
            raise ConfigError(f"grid {path}: unknown table [{table}]; valid: {', '.join(TABLES)}")
    grid = doc.get("grid", {})
    for key in grid:
        if key not in GRID_KEYS:
            raise ConfigError(f"grid {path}: unknown [grid] key {key!r}; valid: {GRID_KEYS}")
    where = f"grid {path} [grid]"
    methods = _list(grid, "methods", str, where)
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"{where} method {method!r}; valid choices are {', '.join(METHODS)}")
    partitions = []
    for part in grid.get("partitions", [1.0]):
        if part != "iid" and (isinstance(part, bool) or not isinstance(part, int | float)):
            raise ConfigError(f'{where} partition {part!r}: use a Dirichlet alpha > 0 or "iid"')
        if part != "iid" and part <= 0:
            raise ConfigError(f'{where} partition {part!r}: use a Dirichlet alpha > 0 or "iid"')
        partitions.append("iid" if part == "iid" else f"{float(part):g}")
    run_config = doc.get("run-config", {})
    for key in run_config:
        if key in CELL_KEYS:
            raise ConfigError(f"grid {path} [run-config] sets {key!r}: the grid sets it per cell")
    parse_run_config(run_config)  # unknown keys and bad values fail here, before any run
    rates: dict[str, list[float]] = {}
    for method in doc.get("learning-rate", {}):
        if method not in METHODS:
            raise ConfigError(f"grid {path} [learning-rate] {method!r} is not a method: {METHODS}")
        values = _list(doc["learning-rate"], method, float | int, f"grid {path} [learning-rate]")
        if any(v <= 0 for v in values):
            raise ConfigError(f"grid {path} [learning-rate] {method}={values!r}: rates must be > 0")
        rates[method] = [float(v) for v in values]
    targets = {str(k): float(v) for k, v in doc.get("target-accuracy", {}).items()}
    strategies = _list(grid, "strategies", str, where) if "strategies" in grid else ["fedavg"]
    for name in strategies:
        if name not in STRATEGIES:
            valid = ", ".join(STRATEGIES)
            raise ConfigError(f"{where} strategy {name!r}; valid choices are {valid}")
    return Grid(
        name=path.stem,
        methods=methods,
        datasets=_list(grid, "datasets", str, where),
        partitions=partitions,
        seeds=_list(grid, "seeds", int, where) if "seeds" in grid else [42],
        num_clients=int(grid.get("num-clients", 10)),
        cpus_per_client=int(grid.get("cpus-per-client", 1)),
        run_config=run_config,
        learning_rates=rates,
        targets=targets,
        strategies=strategies,
        strategy_params=_strategy_params(doc.get("strategy-params", {}), strategies, path),
    )


def _strategy_params(table: dict, strategies: list[str], path: Path) -> dict[str, list[Variant]]:
    """[strategy-params]: per strategy a list of settings to sweep, e.g.
    `fedadam = [{eta = 0.01}, {eta = 0.03}]`; each key must be one of that strategy's own."""
    from federa_app.federation.strategies import own_parameters

    where = f"grid {path} [strategy-params]"
    variants: dict[str, list[Variant]] = {}
    for name, settings in table.items():
        if name not in strategies:
            raise ConfigError(f"{where} {name!r} is not one of the grid's strategies {strategies}")
        if not isinstance(settings, list) or not all(isinstance(v, dict) for v in settings):
            raise ConfigError(f"{where} {name} must be a list of tables, e.g. [{{eta = 0.01}}]")
        allowed = own_parameters(name)
        for setting in settings:
            for key in setting:
                if key not in allowed:
                    raise ConfigError(
                        f"{where} {name}: {key!r} is not its parameter; its own: "
                        f"{', '.join(allowed) or 'none'}"
                    )
            parse_run_config({"strategy": name, **setting})  # ranges, types
        variants[name] = [
            tuple(sorted((k, STRATEGY_PARAMS[k](v)) for k, v in s.items())) for s in settings
        ]
    return variants


def cell_key(overrides: dict[str, Any], num_clients: int) -> str:
    """A short hash of everything that decides a cell's result: its resolved config."""
    resolved = parse_run_config({**app_defaults(default_app_dir()), **overrides}).to_dict()
    for key in REPORTING_KEYS:
        resolved.pop(key, None)
    resolved["num-clients"] = num_clients
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:10]


def expand(grid: Grid) -> list[Cell]:
    """Every cell of the grid, in a stable order (method-major, so a stop leaves whole methods).

    A strategy that cannot aggregate a method (`refused`) has no cells with it.
    """
    cells = []
    combos = itertools.product(
        grid.methods, grid.strategies, grid.datasets, grid.partitions, grid.seeds
    )
    for method, strategy, dataset, part, seed in combos:
        if refusal(strategy, method):
            continue
        rates = grid.learning_rates.get(method) or [METHOD_LEARNING_RATES[method]]
        for lr, variant in itertools.product(rates, grid.strategy_params.get(strategy, [()])):
            overrides = {
                **grid.run_config,
                "method": method,
                "dataset": dataset,
                "seed": seed,
                "learning-rate": lr,
                "target-accuracy": grid.targets.get(dataset, 0.0),
                **({"strategy": strategy} if strategy != "fedavg" else {}),
                **dict(variant),
            }
            if part == "iid":
                overrides["partitioner"] = "iid"
            else:
                overrides.update({"partitioner": "dirichlet", "dirichlet-alpha": float(part)})
            key = cell_key(overrides, grid.num_clients)
            cells.append(Cell(method, dataset, part, seed, lr, overrides, key, strategy, variant))
    return cells


def refused(grid: Grid) -> list[tuple[str, str, str]]:
    """(strategy, method, one-line reason) for the grid's combinations the app refuses."""
    pairs = itertools.product(grid.strategies, grid.methods)
    return [(s, m, reason) for s, m in pairs if (reason := refusal(s, m))]


def is_finished(out_dir: Path, cell: Cell) -> bool:
    """A cell is finished when its run directory holds summary.json (written last)."""
    return (out_dir / "runs" / cell.name / SUMMARY_FILE).is_file()


def check_cells(grid: Grid, cells: list[Cell]) -> None:
    """Everything checkable before the first simulation: data, model, partitions, node counts."""
    seen = set()
    for cell in cells:
        what = (cell.dataset, cell.partition, cell.seed, cell.method, cell.strategy, cell.variant)
        if what in seen:
            continue
        seen.add(what)
        try:
            cfg = parse_run_config({**app_defaults(default_app_dir()), **cell.overrides})
            check_before_start(cfg, grid.num_clients)
        except ConfigError as exc:
            raise ConfigError(f"cell {cell.name}: {exc}") from None


def run_grid(grid: Grid, out_dir: Path, run: RunCell, log: Log = print) -> list[tuple[Cell, str]]:
    """Run every unfinished cell with `run` (`federa simulate`'s function); return the failures.

    `run` is passed in so that the harness stays below the operator's tools that start processes.
    """
    out_dir = Path(out_dir).resolve()
    cells = expand(grid)
    todo = [c for c in cells if not is_finished(out_dir, c)]
    log(f"federa compare: grid {grid.name}, {len(cells)} cells, {len(cells) - len(todo)} finished")
    check_cells(grid, todo)
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (out_dir / "grid.json").write_text(json.dumps(grid.__dict__, indent=2) + "\n")
    failures = []
    for i, cell in enumerate(todo, 1):
        run_dir = runs / cell.name
        if run_dir.exists():  # a cell stopped part-way: its partial run is of no use
            log(f"  removing unfinished {run_dir.name}")
            shutil.rmtree(run_dir)
        log(f"[{i}/{len(todo)}] {cell.name}")
        started = time.perf_counter()
        overrides = {**cell.overrides, "run-name": cell.name}
        try:
            run(grid.num_clients, overrides, runs, None, grid.cpus_per_client, _indent(log))
        except RunFailed as exc:
            log(f"  FAILED: {exc}")
            failures.append((cell, str(exc)))
            continue
        log(f"  done in {time.perf_counter() - started:.0f} s")
    return failures


def _indent(log: Log) -> Log:
    return lambda line: log(f"  {line}")
