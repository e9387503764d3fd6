"""run.storage: local paths and URIs round-trip, inputs resolve on the driver, and runs a
cluster cannot serve are refused before any actor starts (no Ray here: the node probe's
answers are given)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.config import ConfigError, GRPOStageConfig, load_config
from orchestrator.storage import NodeProbe, RunStorage, StorageError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["path", "file-uri"])
def run_storage(request, tmp_path) -> tuple[RunStorage, Path]:
    """A run's storage as a local path and as a file:// URI, and where its bytes land."""
    base = tmp_path / "store"
    location = str(base) if request.param == "path" else f"file://{base}"
    return RunStorage.of(location, "exp"), base / "exp"


def test_driver_files_round_trip(run_storage):
    run, on_disk = run_storage
    run.write_text("config.yaml", "a: 1\n")
    run.append("metrics.jsonl", '{"step": 1}\n')
    run.append("metrics.jsonl", '{"step": 2}\n')
    run.write_text("checkpoints/trainer_state.json", "{}")
    assert (on_disk / "config.yaml").read_text() == "a: 1\n"
    assert (on_disk / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert run.read_text("checkpoints/trainer_state.json") == "{}"
    assert run.exists("config.yaml") and not run.exists("nope.json")
    assert run.read_text("nope.json") is None
    assert not list(on_disk.rglob("*.tmp")), "an atomic write left its temporary file in storage"


def test_directories_round_trip_through_an_actor_writer(run_storage, tmp_path):
    run, on_disk = run_storage
    where, publish = run.writer("final", rank=0)
    assert Path(where).is_absolute()
    Path(where).mkdir(parents=True, exist_ok=True)
    (Path(where) / "model.safetensors").write_bytes(b"weights")
    (Path(where) / "sub").mkdir()
    (Path(where) / "sub" / "x.json").write_text("{}")
    if publish is not None:
        publish()  # what learner rank 0 calls on its node
        assert not Path(where).exists(), "the node-local staging copy was left behind"
    assert (on_disk / "final" / "model.safetensors").read_bytes() == b"weights"
    assert (on_disk / "final" / "sub" / "x.json").read_text() == "{}"

    where, fetch = run.reader("final", rank=1)
    if fetch is not None:
        fetch()
    assert (Path(where) / "model.safetensors").read_bytes() == b"weights"
    back = run.get_dir("final", tmp_path / "back")
    assert (back / "sub" / "x.json").read_text() == "{}"


def test_a_local_storage_is_written_in_place_and_a_uri_through_staging(tmp_path):
    local = RunStorage.of(str(tmp_path), "r")
    assert local.writer("final") == (str(tmp_path / "r" / "final"), None)
    assert local.local == tmp_path / "r"
    uri = RunStorage.of(f"file://{tmp_path}", "r")
    where, publish = uri.writer("checkpoints", rank=1)
    assert where.startswith(str(storage.STAGING)) and publish.remote == f"file://{tmp_path}/r/checkpoints"
    assert uri.local != tmp_path / "r" and uri.local.is_relative_to(storage.STAGING)


def test_relative_paths_resolve_against_the_drivers_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunStorage.of("runs", "exp").root == str(tmp_path / "runs" / "exp")
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.join("s3://bucket/runs/", "exp", "final") == "s3://bucket/runs/exp/final"
    (tmp_path / "runs" / "m").mkdir(parents=True)
    assert storage.resolve_input("runs/m", model=True) == str(tmp_path / "runs" / "m")
    assert storage.resolve_input("Qwen/Qwen2.5-0.5B", model=True) == "Qwen/Qwen2.5-0.5B"
    assert storage.resolve_input("data/x.jsonl") == str(tmp_path / "data" / "x.jsonl")
    assert storage.resolve_input("gs://b/x.jsonl") == "gs://b/x.jsonl"


def test_prepare_makes_every_input_absolute_and_stages_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    monkeypatch.setattr(storage, "MODEL_CACHE", tmp_path / "cache")
    monkeypatch.setattr(storage, "STAGING", tmp_path / "staging")
    cfg = GRPOStageConfig.model_validate({
        "model": {"path": f"file://{tmp_path}/models/m"},
        "data": {"train_path": f"file://{tmp_path}/remote/train.jsonl"},
        "rewards": {"reward_models": [{"name": "h", "path": "models/m", "scope": "summary"}]}})
    p = storage.prepare(cfg, models=("model.path", "rewards.reward_models.*.path"), data=("data.train_path",))
    assert p.config.run.storage == str(tmp_path / "runs") and p.run.root == str(tmp_path / "runs" / "grpo")
    assert p.config.model.path == f"file://{tmp_path}/models/m", "config.yaml records the URI as given"
    assert p.config.rewards.reward_models[0].path == str(tmp_path / "models" / "m")
    staged = Path(p.local.model.path)
    assert staged.is_absolute() and (staged / "config.json").exists() and staged == Path(storage.model_cache_path(
        f"file://{tmp_path}/models/m"))
    assert Path(p.local.data.train_path).read_text().startswith('{"prompt"')
    assert set(p.model_paths) == {str(staged), str(tmp_path / "models" / "m")}
    assert p.model_uris == ((f"file://{tmp_path}/models/m", str(staged)),)


def test_a_model_uri_is_staged_once_per_node(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MODEL_CACHE", tmp_path / "cache")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_text("1")
    uri = f"file://{tmp_path}/m"
    first = storage.stage_model(uri, storage.model_cache_path(uri))
    (Path(first) / "w.bin").write_text("staged")  # a second call must not download again
    assert storage.model_cache_path(uri) == first
    assert storage.stage_model(uri, storage.model_cache_path(uri)) == first
    assert (Path(first) / "w.bin").read_text() == "staged", "a staged model was downloaded twice"
    (tmp_path / "m" / "w.bin").write_text("22")  # new content (a rerun's model): a new cache entry
    second = storage.stage_model(uri, storage.model_cache_path(uri))
    assert second != first and (Path(second) / "w.bin").read_text() == "22"
    with pytest.raises(StorageError, match="does not exist"):
        storage.prepare(GRPOStageConfig.model_validate({"model": {"path": f"file://{tmp_path}/none"},
                                                        "data": {"train_path": "d.jsonl"}}), models=("model.path",))


def test_a_relative_storage_inside_a_ray_job_working_dir_is_refused(tmp_path, monkeypatch):
    job = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg = GRPOStageConfig.model_validate({"model": {"path": "m"}, "data": {"train_path": "d"}})
    with pytest.raises(StorageError, match=r"deletes with the session.*run.storage=\$PWD/runs"):
        storage.for_run(cfg.run)
    storage.check_location("/shared/runs")
    storage.check_location("s3://bucket/runs")
    monkeypatch.chdir(tmp_path)
    storage.check_location("runs")  # not a job: today's relative default
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    with pytest.raises(StorageError, match="relative"):
        storage.check_location("runs")


def test_nodes_that_cannot_read_or_see_storage_are_named_with_the_fix():
    marker = "/local/runs/exp/.r1lab-storage-check-1"
    ok = NodeProbe("aaa", "10.0.0.1")
    storage.check_nodes([ok, ok], marker=marker, storage_root="/local/runs/exp", inputs={"/m": "model.path"})
    blind = NodeProbe("bbb", "10.0.0.2", missing=("/m", marker))
    with pytest.raises(StorageError) as err:
        storage.check_nodes([ok, blind], marker=marker, storage_root="/local/runs/exp", inputs={"/m": "model.path"})
    text = str(err.value)
    assert "node bbb (10.0.0.2) cannot read model.path /m" in text
    assert "node bbb (10.0.0.2) cannot see run.storage /local/runs/exp" in text
    assert "aaa" not in text and "deploy/pvc.yaml" in text and "s3://" in text
    late = NodeProbe("ccc", "10.0.0.3", error="did not answer within 60 s (GetTimeoutError)")
    with pytest.raises(StorageError, match=r"node ccc \(10.0.0.3\) did not answer"):
        storage.check_nodes([late], marker=marker, storage_root="/x", inputs={})


def test_output_dir_names_its_new_place(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {output_dir: runs}\nmodel: {path: m}\ndata: {train_path: d.jsonl}\n")
    with pytest.raises(ConfigError, match="run.output_dir moved to run.storage"):
        load_config(path)
    path.write_text("model: {path: m}\ndata: {train_path: d.jsonl}\n")
    with pytest.raises(ConfigError, match="write run.storage=/x"):
        load_config(path, ["run.output_dir=/x"])
    assert load_config(path, ["run.storage=s3://b/runs"]).run.location == "s3://b/runs/grpo"


def test_learner_ranks_refuse_a_relative_output_path():
    from learner.rank import LearnerRank

    rank = LearnerRank("m", None, rank=0, world_size=1, seed=0)
    for call in (lambda: rank.save_hf("runs/x/final"), lambda: rank.save_checkpoint("ckpt", "t"),
                 lambda: rank.load_checkpoint("ckpt", "t")):
        with pytest.raises(ValueError, match="relative"):
            call()


def test_a_uri_runs_driver_mirror_never_answers_for_storage(tmp_path):
    run = RunStorage.of(f"file://{tmp_path}/a", "r")
    run.write_text("checkpoints/trainer_state.json", "{}")
    (tmp_path / "a" / "r" / "checkpoints" / "trainer_state.json").unlink()
    assert run.read_text("checkpoints/trainer_state.json") is None
