"""The ``r1lab`` command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

def _token_mode() -> None:
    """Ray's client sends a token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) only in token
    mode, read when ray is imported: turn it on first, unless RAY_AUTH_MODE says otherwise."""
    import os

    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")) \
            and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"


_token_mode()

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train reasoning models with GRPO and the DeepSeek-R1 recipe on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Make datasets.")
app.add_typer(data_app, name="data")
console = Console()



def _error(message: str) -> None:
    """``error: message`` in red, the message as plain text (data may hold brackets)."""
    from rich.text import Text

    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def _fail(message: str) -> None:
    _error(message)
    raise typer.Exit(2)


def _logging(verbose: bool) -> None:
    import os

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if verbose:
        os.environ["R1LAB_VERBOSE"] = "1"  # orchestrator.cluster.VERBOSE: actors' output on the console too


@app.command()
def run(
    stage: Annotated[str, typer.Argument(help="stage to run: grpo, sft, sample, eval, distill, pipeline")],
    config: Annotated[Path, typer.Option("-c", "--config", help="YAML config")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run a stage in this process (against RAY_ADDRESS or an embedded local cluster)."""
    from orchestrator.config import ConfigError, load_config
    from orchestrator.stages import StageError, load_stage

    _logging(verbose)
    try:
        module = load_stage(stage)
        cfg = load_config(config, overrides or [], model=module.Config)
    except (StageError, ConfigError) as err:
        _fail(str(err))
    start, started_at = time.monotonic(), time.time()
    if not console.is_terminal:
        # Names the run in job logs, so `r1lab status` knows a plain `ray job submit` of it.
        from orchestrator.jobs import header_line

        console.print(header_line(cfg.run.name, stage), markup=False, soft_wrap=True)
    try:
        with _progress() as progress:
            task = progress.add_task(stage, total=None, info="checking inputs, starting actors")

            def on_progress(done: int, total: int, info: str) -> None:
                progress.update(task, completed=done, total=total, info=info)
                if not console.is_terminal:
                    # One parseable line per step for job logs (`r1lab status` reads it).
                    console.print(f"[r1lab] {stage} {done}/{total} {info}", markup=False, soft_wrap=True)

            run_dir = module.run(cfg, progress=on_progress)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure ends as sentences
        _run_failed(err, stage, config, overrides or [], cfg, verbose, started_at)
    if stage != "grpo" or not _stopped_hint(config, overrides or [], cfg):
        console.print(f"[green]done[/] in {time.monotonic() - start:.0f}s: {run_dir}")
    _summary(run_dir)


def _run_failed(err: BaseException, stage: str, config: Path, overrides: list[str], cfg, verbose: bool,
                since: float) -> None:
    """Print what failed, what was saved and how to continue (three lines at most); the
    traceback goes to the run's log file (and to the console with -v)."""
    from orchestrator import failures
    from orchestrator.preflight import PreflightError

    if isinstance(err, PreflightError):  # the message is the whole story; nothing was started
        if verbose:
            console.print_exception()
        _error(str(err))
        raise typer.Exit(2)
    try:
        logged = f"traceback: {failures.log_traceback(err, cfg, since)}"
    except Exception as log_err:  # noqa: BLE001 - a full disk, say: the sentence still matters most
        logged = f"the traceback could not be written ({log_err})"
    if verbose:
        console.print_exception()
    _error(failures.what_failed(err))
    try:
        after = failures.saved_and_next(stage, config, overrides, cfg, since)
    except Exception:  # noqa: BLE001 - storage unreachable: say nothing rather than guess
        after = None
    if after is not None:
        console.print(after[0], soft_wrap=True, markup=False)
        console.print(f"{after[1]}  ({logged})", soft_wrap=True, markup=False, style="default")
    else:
        console.print(f"({logged})", soft_wrap=True, markup=False)
    from orchestrator.stages import StageError

    raise typer.Exit(130 if isinstance(err, KeyboardInterrupt) else 2 if isinstance(err, StageError) else 1)


def _stopped_hint(config: Path, overrides: list[str], cfg) -> bool:
    """A grpo run that returned without ``final/`` was stopped: say how to continue it."""
    from orchestrator import failures, storage

    run = storage.RunStorage.of(cfg.run.storage, cfg.run.name)
    if run.exists("final"):
        return False
    after = failures.saved_and_next("grpo", config, overrides, cfg)
    if after is None:
        return False
    from rich.text import Text

    console.print(Text.assemble(("stopped", "yellow"), f"; {after[0]}"), soft_wrap=True)
    console.print(after[1], soft_wrap=True, markup=False)
    return True


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                    transient=False)


def _summary(run_dir: Path) -> None:
    from orchestrator.metrics import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        return
    k = min(5, len(rows))
    first, last = rows[:k], rows[-k:]
    table = Table(title=f"first vs last {k} steps")
    table.add_column("metric")
    table.add_column("first", justify="right")
    table.add_column("last", justify="right")
    preferred = ("reward_mean", "accuracy", "format_ok", "response_tokens_mean", "kl", "logprob_gap",
                 "loss", "token_accuracy")
    for key in (k for k in preferred if k in rows[0]):
        mean = lambda rs: sum(r[key] for r in rs if r.get(key) is not None) / max(1, sum(r.get(key) is not None for r in rs))  # noqa: E731
        table.add_row(key, f"{mean(first):.4f}", f"{mean(last):.4f}")
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where models, data and runs go")] = Path("runs"),
    rl_steps: Annotated[Optional[int], typer.Option(help="GRPO steps per RL stage (default: the configs')")] = None,
    eval_prompts: Annotated[int, typer.Option(help="held-out prompts per evaluation")] = 64,
    k: Annotated[int, typer.Option(help="samples per prompt for pass@1 and cons@k")] = 8,
    pretrain_steps: Annotated[int, typer.Option(help="offline pretraining steps of the two base models")] = 600,
    sample_prompts: Annotated[int, typer.Option(help="training prompts the rejection-sampling step samples")] = 1024,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """The R1 recipe on a synthetic task on this machine's CPUs: R1-Zero, the R1 pipeline,
    distillation, and an evaluation table of every checkpoint."""
    from orchestrator.tools.demo import run_demo

    _logging(verbose)
    start = time.monotonic()
    stamp = lambda text: console.print(f"[dim]{time.monotonic() - start:6.0f}s[/] {text}")  # noqa: E731
    demo_dir = run_demo(out, rl_steps=rl_steps, eval_prompts=eval_prompts, k=k, pretrain_steps=pretrain_steps,
                        sample_prompts=sample_prompts, progress=stamp)
    import json

    results = json.loads((demo_dir / "results.json").read_text())
    table = Table(title=f"held-out addition: pass@1 over k={k} samples (T 0.6, top-p 0.95) and cons@{k}; "
                        "held-out general prompts: share of samples with the helpful summary / free of the "
                        "rude remark")
    for col in ("checkpoint", "params", "pass@1", f"cons@{k}", "tokens", "helpful", "harmless"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for r in results["checkpoints"]:
        table.add_row(r["name"], f"{(r['params'] or 0) / 1e6:.2f}M", f"{r['pass@1']:.3f}", f"{r['cons@k']:.3f}",
                      f"{r['mean_response_tokens']:.1f}", f"{r['general_helpful']:.2f}", f"{r['general_harmless']:.2f}")
    console.print(table)
    console.print(f"results: {demo_dir / 'results.json'}; curves: {demo_dir}/*.png; "
                  f"wall time {time.monotonic() - start:.0f}s")


@app.command("init-model")
def init_model(
    out: Annotated[Path, typer.Argument(help="directory to write the model into")],
    task: Annotated[str, typer.Option(help="task whose corpus trains the tokenizer and model")] = "addition",
    pretrain_steps: Annotated[int, typer.Option(help="pretraining steps on the noisy task corpus (0: random init)")] = 600,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    answer_noise: Annotated[float, typer.Option(help="share of pretraining answers corrupted")] = 0.6,
    seed: int = 0,
) -> None:
    """Build a tiny Qwen2 model and tokenizer offline (HF format, safetensors)."""
    from tasks.tinymodel import TinyModelSpec, build_tiny_model

    try:
        spec = TinyModelSpec(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                             intermediate_size=3 * hidden_size)
    except ValueError as err:
        _fail(str(err))
    with _progress() as progress:
        bar = progress.add_task("pretrain", total=max(pretrain_steps, 1), info="")
        build_tiny_model(out, task=task, spec=spec, pretrain_steps=pretrain_steps, answer_noise=answer_noise,
                         seed=seed, progress=lambda s, n, loss: progress.update(bar, completed=s, info=f"loss {loss:.3f}"))
    console.print(f"[green]model written[/] to {out}")


@app.command("init-reward-model")
def init_reward_model(
    out: Annotated[Path, typer.Argument(help="directory to write the reward model into")],
    tokenizer: Annotated[Path, typer.Option(help="model directory whose tokenizer the reward model uses")],
    aspect: Annotated[str, typer.Option(help="helpfulness (judges summaries) or harmlessness (whole responses)")],
    examples: Annotated[int, typer.Option(help="labelled synthetic examples to train on")] = 2000,
    steps: int = 200,
    seed: int = 0,
) -> None:
    """Build a tiny sequence-classification reward model for the general prompts (§2.3.4)."""
    import random

    from tasks.synthetic import GeneralTask
    from tasks.tinymodel import build_tiny_reward_model

    if not (tokenizer / "tokenizer.json").exists() and not (tokenizer / "tokenizer_config.json").exists():
        _fail(f"--tokenizer {tokenizer} holds no tokenizer; build a model first with `r1lab init-model {tokenizer}`")
    try:
        data = GeneralTask().judged_examples(aspect, examples, random.Random(seed))
    except ValueError as err:
        _fail(str(err))
    with _progress() as progress:
        bar = progress.add_task("train", total=steps, info="")
        build_tiny_reward_model(out, tokenizer, data, steps=steps, seed=seed,
                                progress=lambda s, n, loss: progress.update(bar, completed=s, info=f"loss {loss:.3f}"))
    console.print(f"[green]reward model ({aspect}) written[/] to {out}")


@data_app.command("make")
def data_make(
    task: Annotated[str, typer.Argument(help="task: addition")],
    out: Annotated[Path, typer.Option(help="directory for train.jsonl and test.jsonl")],
    digits: int = 2,
    test_share: float = 0.1,
    seed: int = 0,
    cold_start: Annotated[int, typer.Option(help="also write N R1-format cold-start SFT rows (cold_start.jsonl)")] = 0,
    general: Annotated[bool, typer.Option(help="also write general prompts (general_{train,test}.jsonl, §2.3.4)")] = False,
) -> None:
    """Write a synthetic task's train/test split as JSONL (prompt, answer)."""
    from tasks.synthetic import make_cold_start, make_dataset, make_general

    try:
        paths = make_dataset(task, out, test_share=test_share, seed=seed, digits=digits)
        if general:
            paths.update({f"general_{k}": v for k, v in make_general(out, seed=seed).items()})
        if cold_start:
            paths["cold_start"] = make_cold_start(out / "cold_start.jsonl", n=cold_start, test_share=test_share,
                                                  seed=seed, digits=digits)
    except ValueError as err:
        _fail(str(err))
    for split, path in paths.items():
        n = sum(1 for _ in path.open())
        console.print(f"{split}: {n} rows → {path}")


ADDRESS_HELP = ("the cluster: its dashboard (http://HEAD:8265) or its GCS (HEAD:6379, ray://HEAD:10001, auto); "
                "default RAY_ADDRESS, else the Ray head running on this machine")
Address = Annotated[Optional[str], typer.Option("--address", help=ADDRESS_HELP)]


@app.command()
def start(
    stage: Annotated[str, typer.Argument(help="stage to submit")],
    config: Annotated[Path, typer.Option("-c", "--config", help="YAML config")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides")] = None,
    name: Annotated[Optional[str], typer.Option(help="run name (default: run.name of the config)")] = None,
    working_dir: Annotated[Optional[bool], typer.Option(help="upload this directory as the job's working_dir (default: only for remote clusters)")] = None,
    address: Address = None,
) -> None:
    """Submit a stage as a Ray job (to --address or RAY_ADDRESS, else a local head, started if needed)."""
    from orchestrator import jobs
    from orchestrator.config import ConfigError, load_config
    from orchestrator.stages import StageError, load_stage

    try:
        cfg = load_config(config, overrides or [], model=load_stage(stage).Config)
    except (StageError, ConfigError) as err:
        _fail(str(err))
    run_name = name or cfg.run.name
    try:
        url = jobs.ensure_local_head(address)
        c = jobs.client(url)
    except jobs.JobsError as err:
        _fail(str(err))
    remote = not jobs.is_local(url) if working_dir is None else working_dir
    extra = [o for o in (overrides or []) if not o.startswith("run.name=")]
    job_id = jobs.submit(c, stage, config, [*extra, f"run.name={run_name}"], run_name, working_dir=remote)
    console.print(f"submitted {stage} as run [bold]{run_name}[/] (job {job_id}) to {url}")
    console.print(run_name)


def _jobs_client(address: str | None):
    from orchestrator import jobs

    try:
        return jobs.connect(address)
    except jobs.JobsError as err:
        _fail(str(err))


@app.command()
def status(address: Address = None) -> None:
    """List the jobs on the cluster: r1lab runs with stage, state, step and key metrics, and
    every other Ray job."""
    from orchestrator import jobs

    url, c = _jobs_client(address)
    try:
        listed = jobs.list_jobs(c)
    except Exception as err:  # noqa: BLE001 - the cluster went away between calls
        _fail(f"the Ray Jobs API at {url} stopped answering ({err})")
    runs = [j for j in listed if j.run is not None]
    others = [j for j in listed if j.run is None]
    table = Table(title=f"r1lab runs on {url}")
    for col in ("run", "stage", "state", "step", "metrics", "job", "started"):
        table.add_column(col)
    for r in runs:
        step = f"{r.step}/{r.total}" if r.step is not None else "-"
        table.add_row(r.run, r.stage or "?", r.status, step, r.info, r.job_id, _started(r.start_time_ms))
    console.print(table)
    if others:
        table = Table(title="other Ray jobs")
        for col in ("job", "state", "entrypoint", "started"):
            table.add_column(col)
        for j in others:
            table.add_row(j.job_id, j.status, _short(j.entrypoint), _started(j.start_time_ms))
        console.print(table)


def _started(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def logs(
    run: Annotated[str, typer.Argument(help="run name or Ray submission id")],
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    address: Address = None,
) -> None:
    """Print a job's log (for a run name, its latest job)."""
    import asyncio

    from orchestrator import jobs

    _, c = _jobs_client(address)
    try:
        job = jobs.find_job(c, run)
    except LookupError as err:
        _fail(str(err))
    if not follow:
        sys.stdout.write(c.get_job_logs(job.job_id))
        return

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


@app.command()
def stop(run: Annotated[str, typer.Argument(help="run name or Ray submission id")], address: Address = None) -> None:
    """Stop a job. An r1lab run stops gracefully: it saves a checkpoint at the next step
    boundary, then exits."""
    from orchestrator import jobs

    _, c = _jobs_client(address)
    try:
        job = jobs.find_job(c, run, active_only=True)
        final = jobs.stop(c, job)
    except (LookupError, RuntimeError) as err:
        _fail(str(err))
    if job.run is None:
        console.print(f"job {job.job_id}: {final}")
    else:
        console.print(f"run {job.run} (job {job.job_id}): {final}; resume with `r1lab resume {job.run}`")


@app.command()
def resume(run: Annotated[str, typer.Argument(help="run name or Ray submission id")], address: Address = None) -> None:
    """Continue a stopped run from its last checkpoint, at the next step."""
    from orchestrator import jobs

    _, c = _jobs_client(address)
    try:
        job_id = jobs.resume(c, jobs.find_job(c, run))
    except (LookupError, RuntimeError) as err:
        _fail(str(err))
    console.print(f"resumed {run} as job {job_id}")


def _register_tools() -> None:
    from orchestrator.tools import plan, report, verify_math

    app.command("verify-math")(verify_math.command)
    app.command("plan")(plan.command)
    app.command("report")(report.command)


_register_tools()

if __name__ == "__main__":
    app()
