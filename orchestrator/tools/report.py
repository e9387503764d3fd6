"""``r1lab report RUN``: plots and a summary of a run's ``metrics.jsonl``.

Writes ``<run>/report/``: one PNG per metric (reward, accuracy, response length — the
paper's Figure 3 —, KL, throughput), ``overview.png`` with all of them in a grid, and
``report.md`` with a table of first-5 vs last-5 step means, the best accuracy, wall time
and weight-push seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    name: str  # file stem
    title: str
    keys: tuple[str, ...]  # metrics.jsonl fields drawn on it
    ylabel: str


PANELS = (
    Panel("reward", "Reward (mean over samples)", ("reward_mean",), "reward"),
    Panel("accuracy", "Accuracy on training prompts", ("accuracy",), "accuracy"),
    Panel("response_length", "Response length (paper Fig. 3)", ("response_tokens_mean",), "tokens"),
    Panel("kl", "KL to the reference policy", ("kl",), "KL (k3)"),
    Panel("throughput", "Throughput", ("rollout_tokens_per_s", "learner_tokens_per_s"), "tokens / s"),
)
SUMMARY_KEYS = ("reward_mean", "accuracy", "format_ok", "response_tokens_mean", "kl",
                "rollout_tokens_per_s", "learner_tokens_per_s", "weight_push_s", "step_s")


class ReportError(ValueError):
    """The run or its metrics are missing."""


def resolve_run(run: str, runs_dir: Path = Path("runs")) -> Path:
    """``run`` is a directory path, or a name under ``runs_dir``."""
    for cand in (Path(run), Path(runs_dir) / run):
        if cand.is_dir():
            if not (cand / "metrics.jsonl").is_file():
                raise ReportError(f"{cand} has no metrics.jsonl: the run has not finished a step yet")
            return cand
    raise ReportError(f"no run {run!r}: neither {Path(run)} nor {Path(runs_dir) / run} is a directory")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summary(rows: list[dict], k: int = 5) -> dict:
    """First-k and last-k means per metric, best accuracy, wall time, weight-push seconds."""
    k = min(k, len(rows))
    out: dict = {"steps": len(rows), "k": k, "first": {}, "last": {}}
    for key in SUMMARY_KEYS:
        out["first"][key] = _mean(_series(rows[:k], key)[1])
        out["last"][key] = _mean(_series(rows[-k:], key)[1])
    steps, acc = _series(rows, "accuracy")
    out["best_accuracy"] = (max(acc), steps[acc.index(max(acc))]) if acc else None
    out["wall_s"] = sum(_series(rows, "step_s")[1])
    push = _series(rows, "weight_push_s")[1]
    out["weight_push_s"] = {"mean": _mean(push), "max": max(push) if push else float("nan"),
                            "total": sum(push)}
    return out


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4g}"


def markdown(run_dir: Path, s: dict) -> str:
    k = s["k"]
    lines = [f"# Report: {run_dir.name}", "",
             f"{s['steps']} steps, wall time {s['wall_s']:.1f} s (sum of step_s).", "",
             f"| metric | first {k} steps | last {k} steps |", "|---|---:|---:|"]
    lines += [f"| {key} | {_fmt(s['first'][key])} | {_fmt(s['last'][key])} |" for key in SUMMARY_KEYS]
    best = s["best_accuracy"]
    lines += ["", f"- best accuracy: {_fmt(best[0])} at step {best[1]}" if best else "- best accuracy: –",
              f"- weight push seconds: mean {_fmt(s['weight_push_s']['mean'])}, "
              f"max {_fmt(s['weight_push_s']['max'])}, total {_fmt(s['weight_push_s']['total'])}", "",
              "## Plots", "", "![overview](overview.png)", ""]
    lines += [f"- [{p.title}]({p.name}.png)" for p in PANELS]
    return "\n".join(lines) + "\n"


def _draw(ax, rows: list[dict], panel: Panel) -> None:
    for key in panel.keys:
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if len(panel.keys) > 1:
        ax.legend()


def write_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report/`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ReportError(f"{run_dir / 'metrics.jsonl'} holds no steps")
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, rows, panel)
        fig.tight_layout()
        fig.savefig(out / f"{panel.name}.png", dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, panel in zip(axes.flat, PANELS, strict=False):
        _draw(ax, rows, panel)
    axes.flat[-1].axis("off")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=100)
    plt.close(fig)
    (out / "report.md").write_text(markdown(Path(run_dir), summary(rows)))
    return out


def command(
    run: Annotated[str, typer.Argument(help="run name under --runs-dir, or a run directory")],
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="where runs live")] = Path("runs"),
) -> None:
    """Plot a run's metrics (reward, accuracy, response length, KL, throughput) and summarise it."""
    from rich.console import Console

    console = Console()
    try:
        out = write_report(resolve_run(run, runs_dir))
    except ReportError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    console.print(f"[green]report[/]: {out / 'report.md'} and {len(PANELS) + 1} plots in {out}")
