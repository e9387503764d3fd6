"""A run on two nodes leaves everything in run.storage and nothing in a node's working
directory: grpo with the learner and the engine on different nodes, storage and model as
file:// URIs (node-local staging, then upload), and the README's `ray job submit` command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
# Small steps: what these tests check is where files land, not learning.
SHORT = [f"grpo.steps={STEPS}", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=2",
         "rollout.max_new_tokens=16", "logging.wandb_mode=disabled", "logging.progress=false"]


def _created_files(cluster) -> dict[str, list[str]]:
    return {name: sorted(str(p.relative_to(node.work_dir)) for p in node.work_dir.rglob("*"))
            for name, node in cluster.nodes.items()}


def _assert_complete_run(run_dir: Path, *, checkpoint: str | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (run_dir / "config.yaml").is_file()
    steps = [int(m) for m in re.findall(r'"step": (\d+)', (run_dir / "metrics.jsonl").read_text())]
    assert steps == list(range(1, STEPS + 1)), f"metrics.jsonl holds steps {steps}"
    if checkpoint is not None:
        tag = run_dir / "checkpoints" / checkpoint
        assert (tag / "trainer_state.json").is_file()
        assert any(tag.rglob("*model_states.pt")) and any(tag.rglob("*optim_states.pt")), (
            f"{tag} lacks DeepSpeed shards: {sorted(p.name for p in tag.rglob('*'))}")
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    assert sum(p.numel() for p in model.parameters()) > 0


def _grpo_overrides(model: str, data: Path, storage: str) -> list[str]:
    # One learner rank (its bundle), one engine (its bundle): STRICT_SPREAD puts the two
    # bundles on the two nodes. β = 0: no reference actor to co-locate.
    return [f"model.path={model}", f"data.train_path={data / 'train.jsonl'}", f"run.storage={storage}",
            "run.name=spread", "cluster.learner_workers=1", "cluster.rollout_engines=1",
            "cluster.placement_strategy=STRICT_SPREAD", "learner.micro_batch_groups=1", "loss.kl_coef=0",
            "grpo.checkpoint_every_steps=1", *SHORT]


def test_grpo_across_nodes_writes_everything_to_uri_storage(ray_two_nodes, ray_driver, tiny_model, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset

    cluster = ray_two_nodes
    data = tmp_path / "data"
    make_dataset("addition", data)
    store = tmp_path / "store"
    before = _created_files(cluster)
    cfg = load_config(ROOT / "configs/demo/grpo.yaml",
                      _grpo_overrides(f"file://{tiny_model}", data, f"file://{store}"))
    ray = ray_driver(cluster)
    t0 = time.monotonic()
    grpo.run(cfg)
    print(f"grpo across two nodes, file:// storage: {time.monotonic() - t0:.0f} s")

    _assert_complete_run(store / "spread", checkpoint="step-1")
    assert _created_files(cluster) == before, "a file landed in a node's working directory"
    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2

    # Resume stages the step-1 checkpoint down from the URI onto the learner's node
    # (restore checks every rank's restored policy version) and trains step 2 again; the
    # first run's row for step 2 is dropped, so no step is recorded twice.
    t0 = time.monotonic()
    grpo.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})}))
    print(f"resumed from the file:// checkpoint: {time.monotonic() - t0:.0f} s")
    steps = [int(m) for m in re.findall(r'"step": (\d+)', (store / "spread" / "metrics.jsonl").read_text())]
    assert steps == [1, 2], f"metrics.jsonl after resuming at step 2 holds steps {steps}"
    assert _created_files(cluster) == before, "a file landed in a node's working directory"


def _readme_job_command() -> str:
    """The `ray job submit` block of the README, as a shell command."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^ray job submit --address http://127\.0\.0\.1:8265(?:.*\\\n)*.*$", text, re.MULTILINE)
    assert block, "README.md has no `ray job submit --address http://127.0.0.1:8265 ...` command"
    return block.group(0).replace("\\\n", " ").strip()


def _fresh_clone(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_the_readme_ray_job_submit_command(ray_two_nodes, tiny_model, tmp_path):
    from tasks.synthetic import make_dataset

    cluster = ray_two_nodes
    clone = _fresh_clone(tmp_path / "r1lab")
    # What the README has a user build first: a tiny model and the addition data, in runs/.
    shutil.copytree(tiny_model, clone / "runs" / "models" / "tiny-addition")
    make_dataset("addition", clone / "runs" / "data" / "addition")
    before = _created_files(cluster)
    command = _readme_job_command().replace("http://127.0.0.1:8265", cluster.dashboard_url)
    # The README's command unchanged, cut to a short run on this 2-core machine.
    command += " " + " ".join([*SHORT, "grpo.prompts_per_step=4", "cluster.learner_workers=2",
                               "learner.micro_batch_groups=2"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the activated .venv
    t0 = time.monotonic()
    done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    print(f"README `ray job submit`: {time.monotonic() - t0:.0f} s\n{done.stdout[-3000:]}")
    assert done.returncode == 0, f"the README's job failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"

    _assert_complete_run(clone / "runs" / "demo-grpo", checkpoint=None)
    assert _created_files(cluster) == before, "a file landed in a node's working directory"
