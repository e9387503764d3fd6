"""Bad input ends before any actor starts: ``r1lab run grpo`` exits 2 within seconds with at
most three lines naming the row, field or setting and the fix, and leaves an earlier run
(and the disk) as it was. Each case runs the real command line in this process. Every check
here but one comes before Ray is joined; a prompt too long for the engine is found while
Ray starts (the prompts are tokenized meanwhile), and the embedded cluster is stopped
again. ``-s`` prints the table of cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT

LIMIT_S = 15.0
GOOD = [{"prompt": f"What is {a}+{a + 1}", "answer": str(2 * a + 1)} for a in range(10, 30)]


def _jsonl(path: Path, rows: list, extra: list[bytes] = ()) -> Path:
    path.write_bytes(b"".join((json.dumps(r) + "\n").encode() for r in rows) + b"".join(extra))
    return path


@pytest.fixture()
def setup(tmp_path, tiny_model):
    """A config for a short run of the tiny model on good data, and the storage it writes to."""
    data = _jsonl(tmp_path / "good.jsonl", GOOD)
    config = tmp_path / "grpo.yaml"
    config.write_text(f"""
run: {{name: probe, storage: {tmp_path / 'runs'}}}
model: {{path: {tiny_model}}}
data: {{train_path: {data}}}
grpo: {{steps: 2, prompts_per_step: 2, samples_per_prompt: 2}}
rollout: {{max_new_tokens: 16, max_model_len: 128, dtype: float32}}
learner: {{micro_batch_groups: 1}}
cluster: {{num_cpus: 3}}
logging: {{wandb_mode: disabled}}
""")
    return config, tmp_path


def _run(config: Path, *overrides: str) -> tuple[int, str, float]:
    from orchestrator.cli import app

    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["run", "grpo", "-c", str(config), *overrides])
    return result.exit_code, result.output, time.monotonic() - t0


def _error(output: str) -> str:
    """The message from ``error:`` on, joined back where rich wrapped it."""
    text = output[output.index("error:"):]
    return " ".join(line.strip() for line in text.splitlines())


def _check(name: str, config: Path, overrides: list[str], pattern: str, *, lines: int = 3) -> str:
    import re

    code, output, seconds = _run(config, *overrides)
    assert code == 2, (name, code, output)
    assert "Traceback" not in output, output
    message = _error(output)
    assert re.search(pattern, message), (name, message)
    assert len(output[output.index("error:"):].strip().splitlines()) <= lines * 3  # rich wraps at 80 columns
    assert seconds < LIMIT_S, (name, seconds)
    print(f"| {name} | {code} | {seconds:.1f} s | {message[:160]} |")
    return message


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_rows_are_named_by_file_line_and_field(setup):
    config, tmp = setup
    cases = [
        ("a JSON array as a row", [b"[1, 2]\n"], r"bad\.jsonl:21: a row must be a JSON object.*got a array"),
        ("a byte that is not UTF-8", [b'{"prompt": "caf\xe9", "answer": "1"}\n'],
         r"bad\.jsonl:21: not UTF-8 text \(byte 0xe9 at column 16\); re-save the file as UTF-8"),
        ("a line that is not JSON", [b'{"prompt": "x", \n'], r"bad\.jsonl:21: not valid JSON"),
        ("a required field missing", [b'{"prompt": "What is 1+1"}\n'],
         r"bad\.jsonl:21: field 'answer' is missing.*data\.prompt_key / data\.answer_key"),
    ]
    for name, extra, pattern in cases:
        data = _jsonl(tmp / "bad.jsonl", GOOD, extra)
        message = _check(name, config, [f"data.train_path={data}"], pattern)
        assert "data.skip_bad_rows=true" in message
        assert not (tmp / "runs").exists(), f"{name}: a run directory was made before pre-flight passed"


def test_a_prompt_longer_than_the_engine_takes_is_named_before_any_actor(setup):
    import ray

    config, tmp = setup
    was_up = ray.is_initialized()  # a cluster of earlier tests in this process is used, and kept
    data = _jsonl(tmp / "long.jsonl", GOOD + [{"prompt": "1 + " * 200 + "1", "answer": "201"}] * 2)
    message = _check("a prompt over max_model_len - max_new_tokens", config, [f"data.train_path={data}"],
                     r"long\.jsonl:21: the prompt is \d+ tokens, over the 112 that rollout\.max_model_len \(128\) "
                     r"minus rollout\.max_new_tokens \(16\) leaves.*\(and 1 more bad rows of 22\)")
    assert "long.jsonl:22" not in message  # the first is named; the rest are counted
    assert not (tmp / "runs").exists()
    assert ray.is_initialized() == was_up  # a cluster the run started meanwhile is stopped again


def test_model_paths_that_name_nothing(setup):
    config, tmp = setup
    _check("a local model path that does not exist", config, [f"model.path={tmp / 'no-such-model'}"],
           r"model\.path .*no-such-model does not exist.*r1lab init-model")
    (tmp / "not-a-model").mkdir()
    _check("a folder that is no model", config, [f"model.path={tmp / 'not-a-model'}"],
           r"not a Hugging Face model directory \(no config\.json")
    # One slash and nothing there: a hub id only if the hub can serve it (tests run offline).
    _check("a hub-like id the hub cannot serve", config, ["model.path=nosuch/model"],
           r"model\.path nosuch/model is no local directory \(nothing at .*nosuch/model\) and HF_HUB_OFFLINE is set")
    assert not (tmp / "runs").exists()


def test_a_run_name_in_use_is_refused_and_the_earlier_run_untouched(setup):
    config, tmp = setup
    earlier = tmp / "runs" / "probe"
    (earlier / "final").mkdir(parents=True)
    (earlier / "config.yaml").write_text("run: {name: probe}\n")
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    (earlier / "final" / "model.safetensors").write_bytes(b"weights")
    before = _snapshot(earlier)
    _check("a run name that holds a run", config, [],
           r"runs/probe already holds a run; continue it with run\.resume=true, move it aside and start afresh "
           r"with run\.overwrite=true, or choose another run\.name")
    assert _snapshot(earlier) == before
    _check("run.resume where nothing was checkpointed", config, ["run.resume=true"],
           r"run\.resume is set but .*runs/probe holds no complete checkpoint: nothing to resume")
    assert _snapshot(earlier) == before
    _check("run.resume of a name never used", config, ["run.resume=true", "run.name=never"],
           r"runs/never does not exist: nothing to resume")
    assert not (tmp / "runs" / "never").exists()


def test_resume_and_overwrite_together_are_refused(setup):
    config, _ = setup
    code, output, seconds = _run(config, "run.resume=true", "run.overwrite=true")
    assert code == 2 and "run.resume and run.overwrite are both set" in _error(output), output
    assert seconds < LIMIT_S


def test_storage_that_cannot_be_written_or_is_too_small(setup):
    config, tmp = setup
    (tmp / "a-file").write_text("")
    _check("run.storage below a file", config, [f"run.storage={tmp / 'a-file' / 'runs'}"],
           r"run\.storage: .*a-file/runs/probe cannot be created: .*a-file is a file, not a directory")
    small = tmp / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here ({mounted.stderr.decode().strip()}): the room check is "
                    "covered by test_room_is_estimated_from_the_model")
    try:
        _check("run.storage with too little room", config, [f"run.storage={small}"],
               r"run\.storage: .*small has 1\.0 MiB free but this run needs about [\d.]+ MiB for a checkpoint and "
               r"final/ \(16 bytes a parameter\); free space there or choose another run\.storage")
        assert not any(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_room_is_estimated_from_the_model(tiny_model, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from orchestrator import preflight, storage

    params = preflight.model_parameters(str(tiny_model))
    weights = (Path(tiny_model) / "model.safetensors").stat().st_size
    assert params == weights // 4  # the tiny model is stored in fp32
    need = preflight.checkpoint_bytes(str(tiny_model))
    run = storage.RunStorage.of(str(tmp_path), "r")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(need * 2, need + 1, need - 1))
    with pytest.raises(preflight.PreflightError, match="needs about"):
        preflight.check_storage(run, need)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(need * 2, need, need))
    preflight.check_storage(run, need)


def test_an_engine_error_and_an_auth_failure_read_as_one_sentence():
    import errno

    import ray

    from orchestrator import failures

    cause = OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/final/model.safetensors")
    task = ray.exceptions.RayTaskError("GRPOLearner.save_hf", "Traceback ...\n" * 50, cause, pid=4242,
                                       ip="10.0.0.7")
    said = failures.what_failed(task)
    assert said.startswith("GRPOLearner.save_hf failed (pid 4242 on node 10.0.0.7): OSError:") and "\n" not in said
    assert failures.what_failed(cause).startswith("no space left on the device writing /data/runs/x/final/")
    auth = ConnectionError("Failed to connect (the cluster answered: Unauthenticated, auth token missing)")
    assert "RAY_AUTH_TOKEN" in failures.what_failed(auth)
    assert "Ctrl-C" in failures.what_failed(KeyboardInterrupt())


def test_the_command_line_fails_in_seconds_from_a_fresh_process(setup):
    """The whole command, interpreter start-up and imports included."""
    config, tmp = setup
    data = _jsonl(tmp / "bad.jsonl", GOOD, [b"[1, 2]\n"])
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "grpo", "-c", str(config),
                           f"data.train_path={data}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip() and "━" not in x and "[r1lab]" not in x]
    assert len(lines) <= 3 and "bad.jsonl:21" in lines[0], lines
    assert seconds < LIMIT_S, seconds
    print(f"| whole command, fresh process | {proc.returncode} | {seconds:.1f} s | {lines[0][:120]} |")


def test_uri_storage_is_checked_by_writing_beside_the_run(tmp_path):
    from orchestrator import preflight, storage

    run = storage.RunStorage.of(f"file://{tmp_path}/store", "r")
    preflight.check_storage(run, None)  # the storage folder is made; the run's is not
    assert (tmp_path / "store").is_dir() and not any((tmp_path / "store").iterdir())
    assert not preflight.holds_run(run)
    (tmp_path / "a-file").write_text("")
    blocked = storage.RunStorage.of(f"file://{tmp_path}/a-file/store", "r")
    with pytest.raises(preflight.PreflightError, match=r"run\.storage: cannot write to file://.*a-file/store"):
        preflight.check_storage(blocked, None)
