"""`r1lab run grpo` trains from a parquet file and from a `datasets.save_to_disk` folder
(the synthetic addition data converted), and a bad row stops the stage, named, before any
actor starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

PROMPTS = 16


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def addition(tmp_path_factory) -> dict[str, list[dict]]:
    """The first rows of the synthetic addition splits, as JSON objects."""
    from tasks.synthetic import make_dataset

    paths = make_dataset("addition", tmp_path_factory.mktemp("addition"))
    return {split: [json.loads(line) for line in path.read_text().splitlines()[:PROMPTS]]
            for split, path in paths.items()}


def _write(fmt: str, addition: dict[str, list[dict]], out: Path) -> tuple[Path, list[str]]:
    """The data in ``fmt``, and the overrides that point a run at it."""
    import datasets

    if fmt == "parquet":
        path = out / "train.parquet"
        datasets.Dataset.from_list(addition["train"]).to_parquet(str(path))
        return path, []
    path = out / "addition"
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in addition.items()}).save_to_disk(str(path))
    return path, ["data.split=train"]


def _run_grpo(tiny_model: Path, data: Path, tmp_path: Path, name: str, extra: list[str]):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from tests.conftest import ROOT

    args = ["run", "grpo", "-c", str(ROOT / "configs/demo/grpo.yaml"),
            f"model.path={tiny_model}", f"data.train_path={data}",
            f"run.storage={tmp_path}", f"run.name={name}", "grpo.steps=2", "grpo.prompts_per_step=2",
            "grpo.samples_per_prompt=2", "cluster.learner_workers=1", "loss.kl_coef=0",
            "learner.micro_batch_groups=1", "rollout.max_new_tokens=8", "rewards.workers=1",
            "logging.wandb_mode=disabled", *extra]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk"])
def test_grpo_trains_from_parquet_and_save_to_disk(fmt, ray_local, tiny_model, tmp_path, addition):
    from orchestrator.metrics import read_metrics

    data, extra = _write(fmt, addition, tmp_path)
    result = _run_grpo(tiny_model, data, tmp_path, f"from-{fmt}", extra)
    assert result.exit_code == 0, result.output
    rows = read_metrics(tmp_path / f"from-{fmt}")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert (tmp_path / f"from-{fmt}" / "final" / "model.safetensors").exists()


def _squeezed(text: str) -> str:
    """Without whitespace: the console wraps long lines, inside long paths too."""
    return "".join(text.split())


class _NoActors:
    """Stands in for orchestrator.cluster: the stage must fail before it is touched."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the stage reached cluster.{name} before its data was checked")


def test_a_bad_row_stops_grpo_before_any_actor_starts(tiny_model, tmp_path, monkeypatch, addition):
    import datasets

    from orchestrator.stages import grpo

    monkeypatch.setattr(grpo, "cluster", _NoActors())
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in [*addition["train"][:2], ["What is 1+2", "3"]]))
    result = _run_grpo(tiny_model, jsonl, tmp_path, "bad-jsonl", [])
    assert result.exit_code == 2, result.output
    assert _squeezed("train.jsonl:3: a row must be a JSON object") in _squeezed(result.output)

    rows = [*addition["train"][:2], {"prompt": addition["train"][2]["prompt"], "answer": None}]
    parquet = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    result = _run_grpo(tiny_model, parquet, tmp_path, "bad-parquet", [])
    assert result.exit_code == 2, result.output
    assert _squeezed("bad.parquet row 3: field 'answer' is null") in _squeezed(result.output)
