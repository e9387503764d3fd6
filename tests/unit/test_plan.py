"""``r1lab plan``: placement of bundles on NODESxGPUS and the per-GPU memory estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from orchestrator.config import GRPOStageConfig, load_config
from orchestrator.tools.plan import CONTEXT_BYTES, GiB, KNOWN_MODELS, command, make_plan, model_shape, parse_cluster


pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

TINY = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 1000, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False, "max_position_embeddings": 512}


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    return d


def tiny_cfg(model: Path, **learner) -> GRPOStageConfig:
    return GRPOStageConfig.model_validate({
        "model": {"path": str(model)},
        "data": {"train_path": "unused.jsonl"},
        "grpo": {"prompts_per_step": 2, "samples_per_prompt": 4},
        "rollout": {"max_new_tokens": 16, "max_model_len": 32},
        "learner": {"zero_stage": 2, "dtype": "bf16", "micro_batch_groups": 1, **learner},
        "loss": {"kl_coef": 0.04},
        "cluster": {"learner_workers": 2, "rollout_engines": 1, "gpus_per_learner": 1, "gpus_per_rollout_engine": 1},
    })


def test_parameter_count_by_hand(tiny_model: Path) -> None:
    m = model_shape(str(tiny_model))
    # head_dim 64/4 = 16; q 64*64 = 4096; k, v 2*(64*32) = 4096; o 4096; qkv bias 64+32+32 = 128
    # attention 12,416; SwiGLU 3*64*128 = 24,576; two norms 128 -> 37,120 per layer, x2 = 74,240
    # embeddings 1000*64 = 64,000; untied lm_head 64,000; final norm 64
    assert m.params == 64_000 + 74_240 + 64 + 64_000 == 202_304


def test_known_models_match_published_sizes() -> None:
    # Qwen2.5 model cards: 0.49B and 1.54B parameters.
    assert round(KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"].params / 1e9, 2) == 0.49
    assert round(KNOWN_MODELS["Qwen/Qwen2.5-1.5B-Instruct"].params / 1e9, 2) == 1.54
    assert round(KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"].params / 1e9, 2) == 1.54
    assert round(KNOWN_MODELS["Qwen/Qwen2.5-7B"].params / 1e9, 2) == 7.62  # card: 7.61B (7,615,616,512)


def test_memory_by_hand(tiny_model: Path) -> None:
    plan = make_plan(tiny_cfg(tiny_model), 1, 3, 4 * GiB)
    assert plan.ok, plan.problems
    by = {a.name: a for a in plan.actors}
    P = 202_304
    # learner, bf16, ZeRO-2 over 2 ranks: weights P*2; grads P*2/2; Adam m, v + fp32 master P*12/2
    # micro-batch tokens 1 group * G 4 * max_model_len 32 = 128
    # activations (no checkpointing): 128 tokens * 2 layers * 2 bytes * (8*64 + 4*128) = 524,288
    # logits: 128 * vocab 1000 * (2 + 8) = 1,280,000
    assert by["learner.0"].memory == {"weights": 404_608, "grads": 202_304, "optimizer": 1_213_824,
                                      "activations": 524_288, "logits": 1_280_000, "context": CONTEXT_BYTES}
    # reference (fp32 by default) shares learner 0's GPU: weights P*4; logits 16 seqs * 32 * 1000 * 12
    assert by["reference"].memory == {"weights": 809_216, "logits": 6_144_000, "context": CONTEXT_BYTES}
    assert by["reference"].gpus == by["learner.0"].gpus == (0,)
    assert by["learner.1"].gpus == (1,)
    # vLLM claims 0.5 of 4 GiB; bf16 weights P*2; 10% kept for activations, the rest is KV cache
    claim = 2 * GiB
    assert by["rollout.0"].gpus == (2,)
    assert by["rollout.0"].memory["weights"] == 404_608
    assert by["rollout.0"].memory["kv_cache"] == int(claim * 0.9) - 404_608
    assert by["rollout.0"].bytes_per_gpu == claim + CONTEXT_BYTES
    assert plan.gpu_bytes(0, 0) == by["learner.0"].bytes_per_gpu + by["reference"].bytes_per_gpu


def test_memory_with_chunked_logprobs_and_packed_micro_batches(tiny_model: Path) -> None:
    cfg = tiny_cfg(tiny_model, logprob_chunk_tokens=16, max_tokens_per_micro_batch=96)
    cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"logprob_chunk_tokens": 8})})
    by = {a.name: a for a in make_plan(cfg, 1, 3, 4 * GiB).actors}
    # packed micro-batches of 96 tokens: activations 96 * 2 layers * 2 bytes * (8*64 + 4*128) = 393,216
    # one chunk of logits at a time: 16 positions * vocab 1000 * (2 + 8) = 160,000
    assert by["learner.0"].memory["activations"] == 393_216
    assert by["learner.0"].memory["logits"] == 160_000
    # reference, fp32: 8 positions * 1000 * (4 + 8) = 96,000
    assert by["reference"].memory["logits"] == 96_000


def test_gradient_checkpointing_keeps_layer_inputs(tiny_model: Path) -> None:
    plan = make_plan(tiny_cfg(tiny_model, gradient_checkpointing=True), 1, 3, 4 * GiB)
    # 128 tokens * (2 layers * 2 bytes * 64 hidden + one full layer 2 * (8*64 + 4*128)) = 128 * 2304
    assert plan.actors[0].memory["activations"] == 128 * 2304


def test_zero3_shards_the_weights(tiny_model: Path) -> None:
    plan = make_plan(tiny_cfg(tiny_model, zero_stage=3), 1, 3, 4 * GiB)
    assert plan.actors[0].memory["weights"] == 404_608 // 2


def test_refuses_too_few_gpus(tiny_model: Path) -> None:
    plan = make_plan(tiny_cfg(tiny_model), 1, 2, 4 * GiB)
    assert not plan.ok
    assert any("add nodes" in p and "rollout.0" in p for p in plan.problems)


def test_spreads_over_nodes(tiny_model: Path) -> None:
    plan = make_plan(tiny_cfg(tiny_model), 2, 2, 4 * GiB)
    assert plan.ok, plan.problems
    assert {a.name: a.node for a in plan.actors if a.gpus} == {
        "learner.0": 0, "reference": 0, "learner.1": 0, "rollout.0": 1}


def test_refuses_over_memory_and_says_what_to_change(tiny_model: Path) -> None:
    # 1.2 GiB GPUs: the learner's 1 GiB context plus states and the reference overflow GPU 0;
    # the rollout engine's 0.6 GiB claim still fits its own GPU.
    plan = make_plan(tiny_cfg(tiny_model), 1, 3, int(1.2 * GiB))
    assert not plan.ok
    over = [p for p in plan.problems if p.startswith("node 0 GPU 0")]
    assert over and "colocate_reference_with_learner=false" in over[0]


def test_zero_stage_advice_for_big_states(tiny_model: Path) -> None:
    big = dict(TINY, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000,
               num_attention_heads=32, num_key_value_heads=32)
    (tiny_model / "config.json").write_text(json.dumps(big))  # ~6.7B parameters
    plan = make_plan(tiny_cfg(tiny_model, gradient_checkpointing=True), 1, 3, 80 * GiB)
    assert any("raise learner.zero_stage to 3" in p for p in plan.problems)
    # ZeRO-3 over 2 ranks: 6.7B * (2 + 2 + 12) / 2 bytes = 50 GiB of states, plus the fp32 reference
    assert make_plan(tiny_cfg(tiny_model, gradient_checkpointing=True, zero_stage=3), 1, 3, 80 * GiB).ok


def test_kv_cache_must_hold_one_sequence(tiny_model: Path) -> None:
    cfg = tiny_cfg(tiny_model)
    plan = make_plan(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(
        update={"gpu_memory_utilization": 0.0001})}), 1, 3, 4 * GiB)
    assert any("raise rollout.gpu_memory_utilization" in p for p in plan.problems)


def test_max_model_len_checked_against_the_model(tiny_model: Path) -> None:
    cfg = load_config(ROOT / "configs/gpu/gsm8k-qwen2.5-0.5b-instruct.yaml",
                      [f"model.path={tiny_model}", "rollout.max_model_len=1536"])
    plan = make_plan(cfg, 1, 2, 80 * GiB)
    assert any("max_position_embeddings (512)" in p for p in plan.problems)


@pytest.mark.parametrize("recipe, nodes, gpus", [
    ("r1zero-qwen2.5-math-1.5b", 1, 8),
    ("gsm8k-qwen2.5-0.5b-instruct", 1, 2),
    ("gsm8k-qwen2.5-1.5b-instruct", 1, 4),
    ("r1zero-qwen2.5-7b-2x8", 2, 8),
])
def test_gpu_recipes_plan_on_the_cluster_they_name(recipe: str, nodes: int, gpus: int) -> None:
    path = ROOT / "configs" / "gpu" / f"{recipe}.yaml"
    assert f"--cluster {nodes}x{gpus}" in path.read_text()  # the recipe says what it is written for
    plan = make_plan(load_config(path), nodes, gpus, 80 * GiB)
    assert plan.ok, "\n".join(plan.lines())
    assert len(plan.gpu_usage()) == nodes * gpus  # every GPU is used
    assert all(b.resources.get("GPU", 0) == 1 for b in plan.placement.bundles)  # one bundle per GPU
    for a in plan.actors:  # each GPU actor on GPUs of one node, one GPU per bundle it holds
        if a.gpus:
            assert len(set(a.gpus)) == len(a.gpus) == len(_bundles_of(plan, a.name))


def _bundles_of(plan, name: str) -> tuple[int, ...]:
    a = next(a for a in plan.placement.actors if a.name == name)
    return a.worker_bundles or (a.bundle,)


def test_two_node_recipe_puts_learners_and_engines_on_nodes_of_their_own() -> None:
    """2x8: ZeRO-3 learner ranks and the reference fill node 0; each TP=2 engine's two
    bundles share a node (node 1), as its STRICT_PACK group demands."""
    cfg = load_config(ROOT / "configs/gpu/r1zero-qwen2.5-7b-2x8.yaml")
    assert cfg.learner.zero_stage == 3 and cfg.rollout.tensor_parallel_size == 2
    plan = make_plan(cfg, 2, 8, 80 * GiB)
    nodes = {a.name: a.node for a in plan.actors if a.gpus}
    assert {n for name, n in nodes.items() if name.startswith("learner")} | {nodes["reference"]} == {0}
    engines = [a for a in plan.actors if a.role == "rollout"]
    assert len(engines) == 4 and all(a.node == 1 and len(a.gpus) == 2 for a in engines)
    groups = plan.placement.groups
    assert [g.strategy for g in groups] == ["PACK"] + ["STRICT_PACK"] * 4
    assert [len(g.bundles) for g in groups] == [8, 2, 2, 2, 2]
    # A cluster with no node of two free GPUs cannot host a TP=2 engine, however many GPUs it has.
    assert any("find no room" in p for p in make_plan(cfg, 16, 1, 80 * GiB).problems)


def test_command_exit_codes(tiny_model: Path, tmp_path: Path) -> None:
    recipe = ROOT / "configs/gpu/gsm8k-qwen2.5-0.5b-instruct.yaml"
    command(recipe, "1x2", [], 80.0)  # fits: returns normally
    with pytest.raises(typer.Exit) as err:
        command(recipe, "1x1", [], 80.0)
    assert err.value.exit_code == 2
    with pytest.raises(typer.Exit):
        command(recipe, "eight", [], 80.0)


def test_parse_cluster() -> None:
    assert parse_cluster("2x8") == (2, 8)
    with pytest.raises(ValueError, match="NODESxGPUS"):
        parse_cluster("0x8")


def test_reward_model_gets_a_bundle_and_its_weights(tiny_model: Path) -> None:
    """§2.3.4: the reward-model actor has its own bundle; its GPU holds the bf16 weights
    of each distinct reward model (one copy when two specs share a path), no LM head."""
    raw = tiny_cfg(tiny_model).model_dump(mode="json")
    raw["rewards"]["reward_models"] = [
        {"name": "helpfulness", "path": str(tiny_model), "scope": "summary", "batch_size": 2, "max_input_tokens": 64},
        {"name": "harmlessness", "path": str(tiny_model), "scope": "response", "batch_size": 2, "max_input_tokens": 64}]
    raw["cluster"]["gpus_per_reward_model"] = 1
    cfg = GRPOStageConfig.model_validate(raw)
    plan = make_plan(cfg, 1, 4, 80 * GiB)
    assert plan.ok, plan.problems
    rm = next(a for a in plan.actors if a.role == "reward_model")
    shape = model_shape(str(tiny_model))
    assert rm.gpus and rm.memory["weights"] == (shape.params - 1000 * 64) * 2
    assert rm.memory["activations"] == 2 * 64 * 2 * (8 * 64 + 4 * 128)
    assert make_plan(cfg, 1, 3, 80 * GiB).problems  # 2 learners + 1 engine + 1 reward model > 3 GPUs
