"""`federa compare`: the smoke preset for real, skip-finished cells, grid errors, the report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SIM_CPUS_PER_CLIENT

from federa_app.config import METHOD_LEARNING_RATES
from federa_app.errors import ConfigError
from federa_app.records.run_dir import SUMMARY_FILE
from federa_ops.cli import main
from federa_ops.simulate import simulate
from simulation.compare import expand, is_finished, load_grid, run_grid
from simulation.report import late_accuracy, write_report

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "adapter", "accuracy.png")


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "federa_ops.cli", "compare", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke preset run once, for real (3 Ray simulations on minilm-l6 + rotten-tomatoes)."""
    out = tmp_path_factory.mktemp("smoke")
    result = _compare(
        "smoke", "--output-dir", str(out), "--cpus-per-client", str(SIM_CPUS_PER_CLIENT)
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out, result


@pytest.mark.integration
@pytest.mark.xdist_group("smoke")  # `make test` runs two workers: the smoke grid runs once
def test_smoke_table_has_a_row_per_cell_from_the_runs(smoke: tuple) -> None:
    out, result = smoke
    grid = load_grid("smoke")
    cells = expand(grid)
    assert len(cells) == 3
    with open(out / "results.csv") as f:
        rows = {row["cell"]: row for row in csv.DictReader(f)}
    assert set(rows) == {c.name for c in cells}
    markdown = (out / "results.md").read_text()
    for cell in cells:
        run_dir = out / "runs" / cell.name
        assert all((run_dir / name).exists() for name in RUN_FILES), run_dir
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        row = rows[cell.name]
        assert row["method"] == summary["method"] == cell.method
        for key in ("final_accuracy", "best_accuracy", "bytes_up_total", "edge_seconds_total"):
            assert float(row[key]) == pytest.approx(summary[key]), key
        # The paper-style table quotes the run's own numbers.
        final, best = summary["final_accuracy"], summary["best_accuracy"]
        assert f"| {cell.method} | {final:.4f} (best {best:.4f}) |" in markdown
        # Time-to-target: the report's recomputation equals what the ServerApp wrote.
        if summary["rounds_to_target"] is not None:
            assert int(row["rounds_to_target"]) == summary["rounds_to_target"]
            mb = (summary["bytes_up_to_target"] + summary["bytes_down_to_target"]) / 1e6
            assert f"| {cell.method} | 1/1 | {summary['rounds_to_target']:.1f} | {mb:.1f} |" in (
                markdown
            )
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["update_norm"] is None
        assert all(m["update_norm"] > 0 for m in metrics[1:])
        assert metrics[2]["update_cosine"] is not None and -1 <= metrics[2]["update_cosine"] <= 1
        assert all(len(m["client_costs"]) == m["clients"] for m in metrics)
    # fft ships the whole model: far more bytes than FeDeRA, as the table must show.
    by_method = {r["method"]: r for r in rows.values()}
    assert float(by_method["fft"]["bytes_up_total"]) > 100 * float(
        by_method["federa"]["bytes_up_total"]
    )
    for png in ("accuracy-rotten-tomatoes-alpha1.png", "updates-rotten-tomatoes-alpha1.png"):
        assert (out / png).stat().st_size > 10_000


@pytest.mark.integration
@pytest.mark.xdist_group("smoke")
def test_rerun_skips_finished_cells(smoke: tuple) -> None:
    out, _ = smoke
    summaries = sorted((out / "runs").glob(f"*/{SUMMARY_FILE}"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    result = _compare("smoke", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "3 cells, 3 finished" in result.stdout
    assert "[1/" not in result.stdout  # nothing was run again
    assert {p: p.stat().st_mtime_ns for p in summaries} == before


def _write_grid(tmp_path: Path, body: str) -> str:
    path = tmp_path / "grid.toml"
    path.write_text(body)
    return str(path)


GRID = """
[grid]
methods = ["federa", "bitfit", "fft"]
datasets = ["rotten-tomatoes"]
partitions = [1.0]
seeds = [1, 2]
num-clients = 2
[run-config]
num-server-rounds = 2
[learning-rate]
bitfit = [0.001, 0.01]
[target-accuracy]
rotten-tomatoes = 0.7
"""


def test_cell_keys_follow_the_resolved_config(tmp_path: Path) -> None:
    cells = expand(load_grid(_write_grid(tmp_path, GRID)))
    assert len(cells) == 2 * (1 + 2 + 1)  # seeds x (federa + two bitfit rates + fft)
    assert len({c.key for c in cells}) == len(cells)
    same = expand(load_grid(_write_grid(tmp_path, GRID)))
    assert [c.name for c in same] == [c.name for c in cells]
    # Reporting settings do not change a cell; a training setting does.
    reporting = GRID.replace("num-server-rounds = 2", "num-server-rounds = 2\nuplink-mbps = 1.0")
    assert [c.key for c in expand(load_grid(_write_grid(tmp_path, reporting)))] == [
        c.key for c in cells
    ]
    changed = GRID.replace("num-server-rounds = 2", "num-server-rounds = 3")
    assert not {c.key for c in expand(load_grid(_write_grid(tmp_path, changed)))} & {
        c.key for c in cells
    }


def _fake_run(out: Path, cell, final: float, accuracies: list[float], seconds: float) -> None:  # noqa: ANN001
    """A finished cell's run directory: every round `seconds` of client compute, 1 MB each way."""
    run_dir = out / "runs" / cell.name
    run_dir.mkdir(parents=True)
    rows = [
        {"round": i, "accuracy": a, "loss": 1 - a,
         "bytes_up": 10**6 * (i > 0), "bytes_down": 10**6 * (i > 0),
         "round_seconds": 2.0, "aggregation_seconds": 0.0,
         "client_costs": [[seconds, 10**6, 10**6]] if i else []}
        for i, a in enumerate(accuracies)
    ]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"method": cell.method, "final_accuracy": final, "best_accuracy": max(accuracies)}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))


def test_skip_finished_and_report_arithmetic(tmp_path: Path) -> None:
    grid = load_grid(_write_grid(tmp_path, GRID))
    cells = expand(grid)
    out = tmp_path / "out"
    assert not any(is_finished(out, c) for c in cells)
    curves = {  # method: (edge seconds per round at default link, accuracy per round)
        "federa": (1.0, [0.5, 0.71, 0.8]),
        "fft": (20.0, [0.5, 0.6, 0.72]),
    }
    for cell in cells:
        if cell.method == "bitfit":  # lr 0.01 is the better rate: it must be the one reported
            good = cell.learning_rate == 0.01
            accs = [0.5, 0.65, 0.75] if good else [0.5, 0.55, 0.6]
            _fake_run(out, cell, accs[-1], accs, 4.0)
        else:
            seconds, accs = curves[cell.method]
            _fake_run(out, cell, accs[-1], accs, seconds)
    assert all(is_finished(out, c) for c in cells)
    (out / "runs" / cells[0].name / SUMMARY_FILE).unlink()  # an interrupted cell
    assert not is_finished(out, cells[0]) and is_finished(out, cells[1])

    (out / "runs" / cells[0].name / SUMMARY_FILE).write_text(
        json.dumps({"method": "federa", "final_accuracy": 0.8, "best_accuracy": 0.8})
    )
    lines = []
    assert run_grid(grid, out, simulate, log=lines.append) == []  # all finished: nothing runs
    assert lines[0].endswith("8 cells, 8 finished")

    text = write_report(grid, out)
    # Link defaults: 1 MB up at 10 Mbit/s = 0.8 s, 1 MB down at 50 Mbit/s = 0.16 s.
    # federa reaches 0.7 in round 1: 1 + 0.96 s; bitfit (lr 0.01) in round 2: 2 x 4.96 s;
    # fft in round 2: 2 x 20.96 s.
    federa_t, bitfit_t, fft_t = 1.96, 2 * 4.96, 2 * 20.96
    assert (
        f"| federa | 2/2 | 1.0 ± 0.0 | 2.0 ± 0.0 | 2 ± 0 | 2 ± 0 | {1 - federa_t / fft_t:.1%} "
        f"| {1 - federa_t / bitfit_t:.1%} |" in text
    )
    assert "| bitfit | 0.7500 ± 0.0000 (best 0.7500 ± 0.0000) |" in text
    assert "| bitfit | rotten-tomatoes | alpha=1 | fedavg | 0.001: 0.6000 (" in text
    assert ", **0.01: 0.7500 (" in text
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    chosen = {(r["method"], r["learning_rate"]) for r in rows if r["chosen"] == "True"}
    defaults = METHOD_LEARNING_RATES
    assert chosen == {
        ("federa", str(defaults["federa"])),
        ("bitfit", "0.01"),
        ("fft", str(defaults["fft"])),
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[grid]\nmethods = ['federa']\ndatasets = ['x']\n[extra]\n", "unknown table [extra]"),
        ("[grid]\nmethods = ['fedx']\ndatasets = ['x']\n", "method 'fedx'; valid choices"),
        ("[grid]\nmethods = ['federa']\ndatasets = ['x']\npartitions = [-1]\n", "partition -1"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\nalphas = [1]\n", "unknown [grid] key"),
        ("[grid]\nmethods = 'lora'\ndatasets = []\n", "datasets=[] must be a non-empty list"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\n[run-config]\nmethod = 'fft'\n",
         "sets 'method': the grid sets it per cell"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\n[run-config]\nrounds = 3\n",
         "unknown run-config key 'rounds'"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\n[learning-rate]\nlora = [0]\n",
         "rates must be > 0"),
        ("[grid\n", "not valid TOML"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\nstrategies = ['fedx']\n",
         "strategy 'fedx'; valid choices"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\n[run-config]\nstrategy = 'krum'\n",
         "sets 'strategy': the grid sets it per cell"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\nstrategies = ['fedadam']\n"
         "[strategy-params]\nkrum = [{num-malicious-nodes = 1}]\n",
         "'krum' is not one of the grid's strategies"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\nstrategies = ['fedadam']\n"
         "[strategy-params]\nfedadam = [{q = 0.2}]\n", "'q' is not its parameter"),
        ("[grid]\nmethods = ['lora']\ndatasets = ['x']\nstrategies = ['fedadam']\n"
         "[strategy-params]\nfedadam = [{eta = -1}]\n", "eta=-1.0 is invalid: must be > 0"),
    ],
)  # fmt: skip
def test_bad_grids_fail_in_one_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_grid(_write_grid(tmp_path, body))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_grid_exits_2_before_running(tmp_path: Path, capsys) -> None:
    result = _compare("no-such-grid", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("federa: error: no grid 'no-such-grid'")
    assert not (tmp_path / "out").exists()
    assert main(["compare", "smoke", "--output-dir", str(tmp_path / "out"),
                 "--cpus-per-client", "0"]) == 2  # fmt: skip
    assert capsys.readouterr().err == "federa: error: --cpus-per-client 0 must be an integer >= 1\n"
    assert not (tmp_path / "out").exists()


def test_late_accuracy_is_the_mean_of_the_later_half() -> None:
    accuracies = [0.5, 0.9, 0.6, 0.7, 0.6, 0.8]  # one lucky early round, one lucky last round
    rows = [{"round": i, "accuracy": a} for i, a in enumerate(accuracies)]
    assert late_accuracy(rows) == pytest.approx((0.7 + 0.6 + 0.8) / 3)  # rounds 3, 4, 5


STRATEGY_GRID = """
[grid]
methods = ["lora", "fft"]
datasets = ["rotten-tomatoes"]
partitions = ["iid"]
strategies = ["fedavg", "fedadam", "svd-avg"]
num-clients = 2

[run-config]
num-server-rounds = 2

[strategy-params]
fedadam = [{eta = 0.01}, {eta = 0.03, tau = 0.001}]
"""


def test_strategy_grids_sweep_each_strategys_parameters_and_skip_refused_pairs(
    tmp_path: Path,
) -> None:
    grid = load_grid(_write_grid(tmp_path, STRATEGY_GRID))
    cells = expand(grid)
    # lora: fedavg, fedadam x 2 settings, svd-avg; fft: fedavg, fedadam x 2 (svd-avg refused)
    assert [(c.method, c.strategy_label) for c in cells] == [
        ("lora", "fedavg"),
        ("lora", "fedadam eta=0.01"),
        ("lora", "fedadam eta=0.03 tau=0.001"),
        ("lora", "svd-avg"),
        ("fft", "fedavg"),
        ("fft", "fedadam eta=0.01"),
        ("fft", "fedadam eta=0.03 tau=0.001"),
    ]
    assert len({c.key for c in cells}) == len(cells)
    # A FedAvg cell keeps the name (and key) it had in grids without strategies.
    fedavg_only = STRATEGY_GRID.split("[strategy-params]")[0].replace(
        '"fedavg", "fedadam", "svd-avg"', '"fedavg"'
    )
    plain = expand(load_grid(_write_grid(tmp_path, fedavg_only)))
    assert cells[0].name == plain[0].name and cells[0].key == plain[0].key
    assert cells[2].name.startswith(
        "lora-rotten-tomatoes-iid-s42-lr0.005-fedadam-eta0.03-tau0.001-"
    )
    assert cells[2].overrides["strategy"] == "fedadam" and cells[2].overrides["tau"] == 0.001

    out = tmp_path / "out"
    for cell in cells:  # fedadam at eta 0.03 learns best for lora; 0.01 for fft
        good = (cell.method, cell.variant) in {
            ("lora", (("eta", 0.03), ("tau", 0.001))),
            ("fft", (("eta", 0.01),)),
        }
        accs = [0.5, 0.7, 0.8] if good else [0.5, 0.6, 0.65]
        _fake_run(out, cell, accs[-1], accs, 1.0)
    text = write_report(grid, out)
    assert "| fedadam | lora | eta=0.03 tau=0.001 | 0.800 | 0.800 |" in text
    assert "| fedadam | fft | eta=0.01 | 0.800 | 0.800 |" in text
    assert "| svd-avg | lora | defaults | 0.650 |" in text
    assert "- svd-avg with fft: strategy svd-avg aggregates the LoRA product" in text
    assert "| lora | rotten-tomatoes | IID | fedadam | 0.005 eta=0.01: 0.6500 (" in text
