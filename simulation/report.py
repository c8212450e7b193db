"""The grid's outputs: results.csv (a row per cell), results.md (the paper's tables), PNG plots.

Learning rates: where a grid sweeps them, each (method, dataset, partition) is reported at the
rate with the best late accuracy (mean over the later half of the rounds, then over seeds: one
lucky or unlucky round under non-IID oscillation does not decide it); results.csv marks it
`chosen`.
Time-to-target is recomputed from each cell's metrics.jsonl with the grid's target and link, so
changing them needs no re-run.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from federa_app.config import parse_run_config
from federa_app.federation.strategies import refusal
from federa_app.records.edge import EdgeLink, edge_round_seconds, time_to_target
from federa_app.records.run_dir import SUMMARY_FILE, read_metrics
from simulation.compare import Cell, Grid, expand, partition_label, refused, variant_label

# The paper's PEFT baselines (FedLR, FedBF, FedAP) and FFA-LoRA: the "fastest PEFT baseline".
PEFT_BASELINES = ("lora", "bitfit", "adapter", "ffa-lora")


def collect(grid: Grid, out_dir: Path) -> list[dict[str, Any]]:
    """One record per finished cell: the cell, its summary, its rows and time-to-target."""
    link = grid.link()
    records = []
    for cell in expand(grid):
        run_dir = Path(out_dir) / "runs" / cell.name
        if not (run_dir / SUMMARY_FILE).is_file():
            continue
        rows = read_metrics(run_dir)
        target = grid.targets.get(cell.dataset, 0.0)
        reached = time_to_target(rows, target, link)
        records.append(
            {
                "cell": cell,
                "summary": json.loads((run_dir / SUMMARY_FILE).read_text()),
                "rows": rows,
                "target": target,
                "reached": reached,
            }
        )
    _mark_chosen(records)
    return records


def _group(cell: Cell) -> tuple[str, str, str, str]:
    """What a report row is about; the cells in a group differ in the settings swept."""
    return cell.method, cell.dataset, cell.partition, cell.strategy


def _swept(cell: Cell) -> tuple[float, tuple]:
    """The swept settings of a cell: its learning rate and its strategy parameters."""
    return cell.learning_rate, cell.variant


def _swept_label(swept: tuple[float, tuple]) -> str:
    lr, variant = swept
    return f"{lr:g} {variant_label(variant)}".strip()


def late_accuracy(rows: list[dict[str, Any]]) -> float:
    """Mean server-side accuracy over the later half of the rounds (rounds > last round / 2)."""
    last = rows[-1]["round"]
    return mean(r["accuracy"] for r in rows if r["round"] > last / 2)


def _by_learning_rate(records: list[dict[str, Any]]) -> dict[tuple, dict[tuple, list[tuple]]]:
    """Per (method, dataset, partition, strategy) and swept setting (learning rate, strategy
    parameters), one (late accuracy, -final loss) per seed: accuracy decides, the server-side
    loss breaks ties (e.g. all stuck at the majority)."""
    by_lr: dict[tuple, dict[tuple, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        score = (late_accuracy(r["rows"]), -r["rows"][-1]["loss"])
        by_lr[_group(r["cell"])][_swept(r["cell"])].append(score)
    return by_lr


def _best_rate(lrs: dict[tuple, list[tuple]]) -> tuple:
    return max(lrs, key=lambda lr: (mean(s[0] for s in lrs[lr]), mean(s[1] for s in lrs[lr])))


def _mark_chosen(records: list[dict[str, Any]]) -> None:
    """Per (method, dataset, partition, strategy): the learning rate and strategy parameters
    with the best mean late accuracy."""
    by_lr = _by_learning_rate(records)
    best = {g: _best_rate(lrs) for g, lrs in by_lr.items()}
    for r in records:
        r["chosen"] = _swept(r["cell"]) == best[_group(r["cell"])]


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    """results.csv: the cell's settings, every summary field, time-to-target, `chosen`."""
    rows = []
    for r in records:
        cell: Cell = r["cell"]
        rows.append(
            {
                "cell": cell.name,
                "method": cell.method,
                "dataset": cell.dataset,
                "partition": cell.partition,
                "seed": cell.seed,
                "learning_rate": cell.learning_rate,
                "strategy_params": variant_label(cell.variant),
                "chosen": r["chosen"],
                **r["summary"],
                "target_accuracy": r["target"],
                **(r["reached"] or {}),
            }
        )
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _mean_std(values: list[float], fmt: str = ".4f") -> str:
    if len(values) > 1:
        return f"{mean(values):{fmt}} ± {stdev(values):{fmt}}"
    return f"{values[0]:{fmt}}"


def _settings(grid: Grid) -> list[tuple[str, str]]:
    return [(d, p) for d in grid.datasets for p in grid.partitions]


def _runs_by_method(
    grid: Grid, chosen: list[dict[str, Any]], d: str, p: str
) -> dict[str, list[dict[str, Any]]]:
    """One setting's chosen runs (one per seed), per method in grid order; methods without any
    finished run are left out."""
    runs = {m: [r for r in chosen if _group(r["cell"])[:3] == (m, d, p)] for m in grid.methods}
    return {m: rs for m, rs in runs.items() if rs}


def accuracy_table(grid: Grid, chosen: list[dict[str, Any]]) -> list[str]:
    """Final (and best) server-side test accuracy, method x (dataset, partition)."""
    settings = _settings(grid)
    head = "| method | " + " | ".join(f"{d} {partition_label(p)}" for d, p in settings) + " |"
    lines = [head, "|---" * (len(settings) + 1) + "|"]
    by_setting = {(d, p): _runs_by_method(grid, chosen, d, p) for d, p in settings}
    for method in grid.methods:
        cells = []
        for d, p in settings:
            rs = by_setting[d, p].get(method)
            if not rs:
                cells.append("—")
                continue
            final = _mean_std([r["summary"]["final_accuracy"] for r in rs])
            best = _mean_std([r["summary"]["best_accuracy"] for r in rs])
            cells.append(f"{final} (best {best})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _edge_time_or_bound(rs: list[dict[str, Any]], link: EdgeLink) -> tuple[float | None, bool]:
    """Mean edge seconds to target over seeds; if a seed never reached it, a lower bound."""
    if all(r["reached"] for r in rs):
        return mean(r["reached"]["edge_seconds_to_target"] for r in rs), True
    total = [sum(edge_round_seconds(row, link) for row in r["rows"]) for r in rs]
    return mean(total), False  # not reached within the run: it would take longer than this


def _reduction(t: float | None, ref: tuple[float | None, bool] | None) -> str:
    if t is None or ref is None or not ref[0]:
        return "—"
    value = 1 - t / ref[0]
    return f"{value:.1%}" if ref[1] else f"≥ {value:.1%}"


def target_table(grid: Grid, chosen: list[dict[str, Any]], d: str, p: str) -> list[str]:
    """Rounds, MB, wall and modelled edge time to the target; reductions vs fft and PEFT."""
    link = grid.link()
    lines = [
        "| method | reached | rounds | MB sent (up+down) | wall s | edge s | vs fft "
        "| vs fastest PEFT baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = _runs_by_method(grid, chosen, d, p)
    times = {method: _edge_time_or_bound(rs, link) for method, rs in runs.items()}
    baselines = {m: t for m, t in times.items() if m in PEFT_BASELINES}
    for method, rs in runs.items():
        hits = [r["reached"] for r in rs if r["reached"]]
        reached = f"{len(hits)}/{len(rs)}"
        if len(hits) < len(rs):
            lines.append(f"| {method} | {reached} | — | — | — | — | — | — |")
            continue
        rounds = _mean_std([h["rounds_to_target"] for h in hits], ".1f")
        mb = _mean_std(
            [(h["bytes_up_to_target"] + h["bytes_down_to_target"]) / 1e6 for h in hits], ".1f"
        )
        wall = _mean_std([h["wall_seconds_to_target"] for h in hits], ".0f")
        edge = _mean_std([h["edge_seconds_to_target"] for h in hits], ".0f")
        others = {m: t for m, t in baselines.items() if m != method}
        fastest = min(others.values(), key=lambda t: t[0]) if others else None
        # A baseline that reached the target beats one whose time is only a lower bound.
        reached_others = [t for t in others.values() if t[1]]
        if reached_others:
            fastest = min(reached_others, key=lambda t: t[0])
        t = times[method][0]
        lines.append(
            f"| {method} | {reached} | {rounds} | {mb} | {wall} | {edge} | "
            f"{_reduction(t, times.get('fft') if method != 'fft' else None)} | "
            f"{_reduction(t, fastest)} |"
        )
    return lines


def sweep_table(records: list[dict[str, Any]]) -> list[str]:
    """Late accuracy per learning rate, where a grid tried more than one."""
    swept = {g: lrs for g, lrs in _by_learning_rate(records).items() if len(lrs) > 1}
    if not swept:
        return []
    lines = [
        "| method | dataset | partition | strategy "
        "| learning rate (and strategy parameters): late accuracy (final loss) |",
        "|---|---|---|---|---|",
    ]
    for (m, d, p, strategy), lrs in sorted(swept.items()):
        best = _best_rate(lrs)
        parts = [
            f"{'**' if lr == best else ''}{_swept_label(lr)}: {mean(a for a, _ in v):.4f} "
            f"({-mean(loss for _, loss in v):.3f}){'**' if lr == best else ''}"
            for lr, v in sorted(lrs.items())
        ]
        lines.append(
            f"| {m} | {d} | {partition_label(p)} | {strategy} | " + ", ".join(parts) + " |"
        )
    return lines


def strategy_table(grid: Grid, records: list[dict[str, Any]], d: str, p: str) -> list[str]:
    """One setting of a grid with several strategies: a row per strategy and method, each at
    its chosen parameters (mean over seeds)."""
    lines = [
        "| strategy | method | parameters (chosen) | final accuracy | best accuracy "
        "| loss: round 0 -> final | final / round-0 loss | rounds to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for strategy, method in itertools.product(grid.strategies, grid.methods):
        if refusal(strategy, method):
            continue
        rs = [r for r in records if r["chosen"] and _group(r["cell"]) == (method, d, p, strategy)]
        if not rs:
            lines.append(f"| {strategy} | {method} | — | not run | | | | |")
            continue
        loss0 = mean(r["rows"][0]["loss"] for r in rs)
        loss = mean(r["rows"][-1]["loss"] for r in rs)
        hits = [r["reached"]["rounds_to_target"] for r in rs if r["reached"]]
        rounds = f"{mean(hits):.1f}" if len(hits) == len(rs) else f"{len(hits)}/{len(rs)} reached"
        params = variant_label(rs[0]["cell"].variant) or "defaults"
        lines.append(
            f"| {strategy} | {method} | {params} "
            f"| {_mean_std([r['summary']['final_accuracy'] for r in rs], '.3f')} "
            f"| {_mean_std([r['summary']['best_accuracy'] for r in rs], '.3f')} "
            f"| {loss0:.3f} -> {loss:.3f} | {loss / loss0:.2f} | {rounds} |"
        )
    return lines


def write_strategy_markdown(
    grid: Grid, records: list[dict[str, Any]], path: Path, note: str = ""
) -> str:
    """results.md of a grid with several strategies: per setting a strategy x method table,
    then the sweep of the strategies' parameters."""
    rounds = parse_run_config(grid.run_config).num_server_rounds
    seeds = f"mean ± std over {len(grid.seeds)} seeds" if len(grid.seeds) > 1 else "one seed"
    lines = [
        f"# Grid `{grid.name}`: {len(records)} finished cells",
        "",
        *([note, ""] if note else []),
        f"{grid.num_clients} clients, {rounds} rounds; server-side accuracy and loss on the "
        f"held-out test split; "
        f"{seeds}; "
        "each method at its default learning rate unless swept. Where a strategy's parameters "
        "were swept, the row shows the setting with the best late accuracy (the sweep table "
        "below has them all). 'defaults': the strategy as `\"\"` resolves it for the method.",
        "",
    ]
    for d, p in _settings(grid):
        target = grid.targets.get(d, 0.0)
        lines += [f"## {d}, {partition_label(p)} (target accuracy {target:g})", ""]
        lines += strategy_table(grid, records, d, p) + [""]
    refusals = refused(grid)
    if refusals:
        lines += ["## Refused combinations", ""]
        lines += [f"- {strategy} with {method}: {reason}" for strategy, method, reason in refusals]
        lines += [""]
    sweep = sweep_table(records)
    if sweep:
        lines += [
            "## Parameter sweep",
            "",
            "Late accuracy: mean over the later half of the rounds; ties go to the lower final "
            "server-side loss. The chosen setting in bold.",
            "",
            *sweep,
            "",
        ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_markdown(grid: Grid, records: list[dict[str, Any]], path: Path, note: str = "") -> str:
    """results.md: the accuracy table, then per setting the time-to-target table."""
    if len(grid.strategies) > 1:
        return write_strategy_markdown(grid, records, path, note)
    chosen = [r for r in records if r["chosen"]]
    link = grid.link()
    seeds = len(grid.seeds)
    lines = [
        f"# Grid `{grid.name}`: {len(records)} finished cells",
        "",
        *([note, ""] if note else []),
        f"{grid.num_clients} clients; server-side accuracy on the held-out test split; "
        f"{'mean ± std over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}; each "
        "method at its chosen learning rate.",
        "",
        "## Final accuracy (best over rounds in brackets)",
        "",
        *accuracy_table(grid, chosen),
        "",
        "## Time to target accuracy",
        "",
        f"Modelled edge time: per round the slowest sampled client's measured ClientApp seconds "
        f"x {link.device_slowdown:g} (device-slowdown) + its bytes at {link.uplink_mbps:g} Mbit/s "
        f"up / {link.downlink_mbps:g} Mbit/s down, plus the server's aggregation time. Wall time: "
        "the simulation as measured here (server-side evaluation included). Reductions compare "
        "edge time; '≥' where the reference never reached the target (its whole run is a lower "
        "bound). Fastest PEFT baseline: the fastest of " + ", ".join(PEFT_BASELINES) + ".",
        "",
    ]
    for d, p in _settings(grid):
        target = grid.targets.get(d, 0.0)
        lines += [f"### {d}, {partition_label(p)}: target accuracy {target:g}", ""]
        lines += target_table(grid, chosen, d, p) + [""] if target > 0 else ["(no target)", ""]
    sweep = sweep_table(records)
    if sweep:
        lines += [
            "## Learning-rate sweep",
            "",
            "Late accuracy: mean over the later half of the rounds (and over seeds); ties go to "
            "the lower final server-side loss. The chosen rate, the one reported above, in bold.",
            "",
            *sweep,
            "",
        ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _mean_curve(rs: list[dict[str, Any]], value: Callable) -> list[float]:
    """Per round, the mean over seeds of `value(row, cumulative)`; rounds all seeds have."""
    n = min(len(r["rows"]) for r in rs)
    return [mean(value(r["rows"], i) for r in rs) for i in range(n)]


def plot_setting(grid: Grid, chosen: list[dict[str, Any]], d: str, p: str, out: Path) -> None:
    """Accuracy vs round, vs modelled edge time, vs megabytes sent: one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    link = grid.link()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for method, rs in _runs_by_method(grid, chosen, d, p).items():
        acc = _mean_curve(rs, lambda rows, i: rows[i]["accuracy"])
        rounds = _mean_curve(rs, lambda rows, i: rows[i]["round"])
        edge_min = _mean_curve(
            rs, lambda rows, i: sum(edge_round_seconds(r, link) for r in rows[1 : i + 1]) / 60
        )
        mb = _mean_curve(
            rs, lambda rows, i: sum(r["bytes_up"] + r["bytes_down"] for r in rows[1 : i + 1]) / 1e6
        )
        for ax, x in zip(axes, (rounds, edge_min, mb), strict=True):
            ax.plot(x, acc, marker="o", ms=3, label=method)
    target = grid.targets.get(d, 0.0)
    labels = ("round", "modelled edge time (minutes)", "megabytes sent (up + down)")
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if target > 0:
            ax.axhline(target, color="grey", ls="--", lw=1)
    axes[2].set_xscale("symlog", linthresh=1.0)
    axes[2].set_xlim(left=0)
    axes[0].set_ylabel("server-side test accuracy")
    axes[0].legend()
    fig.suptitle(f"{d}, {partition_label(p)} ({grid.num_clients} clients; dashed: target)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_updates(grid: Grid, chosen: list[dict[str, Any]], d: str, p: str, out: Path) -> None:
    """Per round: norm of the global update and cosine between successive updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_norm, ax_cos) = plt.subplots(1, 2, figsize=(11, 4))
    for method, rs in _runs_by_method(grid, chosen, d, p).items():
        rows = rs[0]["rows"]  # first seed: updates of different seeds do not average meaningfully
        norm = [(r["round"], r["update_norm"]) for r in rows if r.get("update_norm") is not None]
        cos = [(r["round"], r["update_cosine"]) for r in rows if r.get("update_cosine") is not None]
        if norm:
            ax_norm.plot(*zip(*norm, strict=True), marker="o", ms=3, label=method)
        if cos:
            ax_cos.plot(*zip(*cos, strict=True), marker="o", ms=3, label=method)
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("||global update|| (effective weights)")
    ax_cos.set_ylabel("cosine(update t, update t-1)")
    ax_cos.axhline(0, color="grey", lw=0.8)
    for ax in (ax_norm, ax_cos):
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"Weight updates: {d}, {partition_label(p)} (seed {grid.seeds[0]})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_strategies(grid: Grid, chosen: list[dict[str, Any]], d: str, p: str, out: Path) -> None:
    """Accuracy and server-side loss vs round, one panel pair per method, a line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(grid.methods), figsize=(5 * len(grid.methods), 7.5), sharex=True, squeeze=False
    )
    for col, method in enumerate(grid.methods):
        for strategy in grid.strategies:
            rs = [r for r in chosen if _group(r["cell"]) == (method, d, p, strategy)]
            if not rs:
                continue
            rounds = _mean_curve(rs, lambda rows, i: rows[i]["round"])
            style = "--" if strategy in ("fedavg", "svd-avg") else "-"
            for row, key in enumerate(("accuracy", "loss")):
                curve = _mean_curve(rs, lambda rows, i, key=key: rows[i][key])
                axes[row][col].plot(rounds, curve, style, marker="o", ms=3, label=strategy)
        axes[0][col].set_title(method)
        axes[1][col].set_xlabel("round")
        for row in axes:
            row[col].grid(alpha=0.3)
    axes[0][0].set_ylabel("server-side test accuracy")
    axes[1][0].set_ylabel("server-side test loss")
    labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if labelled:  # a method with no finished cell in this setting has no lines
        labelled[-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Strategies: {d}, {partition_label(p)} ({grid.num_clients} clients)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(grid: Grid, out_dir: Path, note: str = "") -> str:
    """Write results.csv, results.md and the plots for the finished cells; return the markdown."""
    out_dir = Path(out_dir)
    records = collect(grid, out_dir)
    write_csv(records, out_dir / "results.csv")
    chosen = [r for r in records if r["chosen"]]
    plots = []
    for d, p in _settings(grid):
        if not any(_group(r["cell"])[1:3] == (d, p) for r in chosen):
            continue
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in d)[-30:]
        stem += "-iid" if p == "iid" else f"-alpha{p}"
        if len(grid.strategies) > 1:
            plot_strategies(grid, chosen, d, p, out_dir / f"strategies-{stem}.png")
            plots.append(f"strategies-{stem}.png")
            continue
        plot_setting(grid, chosen, d, p, out_dir / f"accuracy-{stem}.png")
        plot_updates(grid, chosen, d, p, out_dir / f"updates-{stem}.png")
        plots += [f"accuracy-{stem}.png", f"updates-{stem}.png"]
    text = write_markdown(grid, records, out_dir / "results.md", note)
    if plots:
        with open(out_dir / "results.md", "a") as f:
            f.write("\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    return text
