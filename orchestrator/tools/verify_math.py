"""``r1lab verify-math FILE.jsonl``: grade (pred, gold) rows with the math reward.

Each row needs ``gold`` and ``pred``; ``expected`` (true/false), when present, is
compared with the verdict. Rows are graded in parallel by the same process pool, with
the same per-call time limit, that scores rewards in training (``rewards.isolation.pool``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rewards.config import RewardSpec
from rewards.types import RewardResult, RewardStatus

console = Console()
_REWARD = "math_accuracy"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; each must have string ``gold`` and ``pred``."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err.msg})") from None
            for key in ("gold", "pred"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{line_no}: field {key!r} must be a string")
            expected = row.get("expected")
            if expected is not None and not isinstance(expected, bool):
                raise ValueError(f"{path}:{line_no}: 'expected' must be true, false or absent")
            rows.append(row)
    return rows


def grade(
    rows: list[dict[str, Any]],
    *,
    extraction: str,
    workers: int,
    timeout_s: float,
    chunk: int = 64,
) -> list[RewardResult]:
    """The math reward's result for each row, scored in the pool."""
    from rewards.isolation.pool import ScoringPool  # sympy and math-verify: only for this command

    spec = RewardSpec(name=_REWARD, options={"extraction": extraction})
    results: list[RewardResult] = []
    with ScoringPool([spec], workers=workers, timeout_s=timeout_s) as pool, Progress(
        TextColumn("grading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        bar = progress.add_task("grading", total=len(rows))
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            scored = pool.score([(r["pred"], r["gold"]) for r in part])
            results.extend(s[_REWARD] for s in scored)
            progress.advance(bar, len(part))
    return results


def _agreement_table(rows: list[dict[str, Any]], verdicts: list[bool], by: str | None) -> Table:
    """Agreement with ``expected`` per group; convention-sensitive rows apart."""
    split = any("convention_sensitive" in r for r in rows)
    table = Table(title="agreement with expected")
    table.add_column(by or "rows")
    for kind in ("rule", "convention") if split else ("all",):
        table.add_column(f"{kind} agree", justify="right")
    tally: dict[str, Counter[str]] = {}
    for row, verdict in zip(rows, verdicts, strict=True):
        if row.get("expected") is None:
            continue
        group = str(row.get(by, "?")) if by else "all"
        kind = "convention" if split and row.get("convention_sensitive") else ("rule" if split else "all")
        c = tally.setdefault(group, Counter())
        c[kind + "_n"] += 1
        c[kind + "_ok"] += int(verdict == row["expected"])
    total: Counter[str] = Counter()
    for group in sorted(tally):
        total.update(tally[group])
        table.add_row(group, *_cells(tally[group], split))
    if by:
        table.add_row("[bold]total", *_cells(total, split))
    return table


def _cells(c: Counter[str], split: bool) -> list[str]:
    cells = []
    for kind in ("rule", "convention") if split else ("all",):
        n, ok = c[kind + "_n"], c[kind + "_ok"]
        cells.append(f"{ok}/{n} ({ok / n:.1%})" if n else "-")
    return cells


def command(
    file: Annotated[Path, typer.Argument(help="JSONL rows with 'gold', 'pred' and optionally 'expected'")],
    out: Annotated[
        Optional[Path],
        typer.Option("-o", "--out", help="verdicts JSONL (default: ./<FILE stem>.verdicts.jsonl)"),
    ] = None,
    extraction: Annotated[
        str,
        typer.Option(help="loose: answers or whole texts, as Math-Verify reads them; "
                          "strict: the training reward (box, <answer> or 'the answer is')"),
    ] = "loose",
    workers: Annotated[int, typer.Option(help="grading processes")] = 2,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="wall-clock limit per row")] = 5.0,
    by: Annotated[
        Optional[str], typer.Option(help="row field to break agreement down by, e.g. source_repo")
    ] = None,
    show: Annotated[int, typer.Option(help="disagreements to print")] = 10,
    min_agreement: Annotated[
        Optional[float],
        typer.Option(help="exit 1 if agreement on rows with 'expected' is below this (0-1)"),
    ] = None,
) -> None:
    """Grade predicted math answers against gold answers; report agreement with 'expected'."""
    if extraction not in ("loose", "strict"):
        console.print(f"[bold red]error:[/] --extraction must be loose or strict, not {extraction!r}")
        raise typer.Exit(2)
    try:
        rows = read_rows(file)
    except (OSError, ValueError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    if not rows:
        console.print(f"[bold red]error:[/] {file} has no rows")
        raise typer.Exit(2)

    results = grade(rows, extraction=extraction, workers=workers, timeout_s=timeout_s)
    verdicts = [r.status is RewardStatus.CORRECT for r in results]
    out = out or Path(f"{file.stem}.verdicts.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for row, result, verdict in zip(rows, results, verdicts, strict=True):
            graded = {"verdict": verdict, "status": result.status.value, "reason": result.reason}
            if row.get("expected") is not None:
                graded["agrees"] = verdict == row["expected"]
            f.write(json.dumps({**row, **graded}, ensure_ascii=False) + "\n")

    statuses = Counter(r.status.value for r in results)
    console.print(f"{len(rows)} rows graded → {out}")
    console.print("  " + ", ".join(f"{s}: {n}" for s, n in statuses.most_common()))
    labelled = [(row, v) for row, v in zip(rows, verdicts, strict=True) if row.get("expected") is not None]
    if not labelled:
        return
    console.print(_agreement_table(rows, verdicts, by))
    wrong = [(row, r) for row, r, v in zip(rows, results, verdicts, strict=True)
             if row.get("expected") is not None and v != row["expected"]]
    for row, result in wrong[:show]:
        ident = row.get("id", "")
        console.print(
            f"[yellow]✗[/] {escape(str(ident))} expected {row['expected']}, got "
            f"{result.status.value}: {escape(result.reason[:100])}",
            highlight=False,
        )
    agreement = 1 - len(wrong) / len(labelled)
    console.print(f"agreement: {len(labelled) - len(wrong)}/{len(labelled)} = {agreement:.1%}")
    if min_agreement is not None and agreement < min_agreement:
        console.print(f"[bold red]below --min-agreement {min_agreement:g}[/]")
        raise typer.Exit(1)
