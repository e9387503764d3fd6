"""Learner configuration: the DeepSpeed engine and optimizer (``LearnerConfig``), and the
GRPO loss conventions (``GRPOLossConfig``, the ``loss`` section of a GRPO stage; SFT has none)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LearnerConfig(BaseModel):
    """The DeepSpeed engine and its optimizer; the rank count is ``cluster.learner_workers``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zero_stage: Literal[0, 1, 2, 3] = 2
    dtype: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="collective backend; auto = nccl with CUDA, else gloo"
    )
    learning_rate: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = Field(default=1.0, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    micro_batch_groups: int = Field(default=1, ge=1, description="groups per forward/backward")
    max_tokens_per_micro_batch: int = Field(
        default=0, ge=0, description="0: micro-batches of micro_batch_groups groups, padded to the longest "
        "sequence; > 0: a rank's sequences packed, without padding, into rows of at most this many tokens "
        "(a longer sequence gets a row alone), one row per forward/backward (micro_batch_groups unused); "
        "a rank's backward then starts once all its groups are in")
    logprob_chunk_tokens: int = Field(
        default=0, ge=0, description="0: log-probs from the full float32 logits [sequences, tokens, vocabulary]; "
        "> 0: the LM head applied this many positions at a time and recomputed in backward (O(chunk x vocabulary) "
        "memory, the same math; learner/logprobs.py)")
    gradient_checkpointing: bool = False
    attn_implementation: Literal["default", "sdpa", "eager", "flash_attention_2"] = Field(
        default="default", description="the learner model's attention (transformers' attn_implementation); "
        "default: transformers' choice (sdpa); flash_attention_2 needs a GPU and the flash-attn package, and runs "
        "packed rows as variable-length attention")
    weight_push_bucket_bytes: int = Field(default=64 * 2**20, ge=2**16)

    @model_validator(mode="after")
    def _chunks_need_an_unsharded_head(self) -> LearnerConfig:
        if self.logprob_chunk_tokens and self.zero_stage == 3:
            # Each call of a ZeRO-3 module gathers its weights, a collective; the number of
            # chunks follows each rank's own token count, so the ranks' gathers would not pair.
            raise ValueError("learner.logprob_chunk_tokens needs zero_stage <= 2: under ZeRO-3 every chunk "
                             "gathers the sharded LM head, and ranks with different token counts would not "
                             "gather together; set learner.logprob_chunk_tokens: 0, or learner.zero_stage: 2")
        return self


class GRPOLossConfig(BaseModel):
    """The GRPO loss (``learner/grpo.py`` documents each convention). Defaults follow
    DeepSeekMath's GRPO (ε = 0.2, β = 0.04, one update per batch); the R1 paper names the
    algorithm but not these values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kl_coef: float = Field(default=0.04, ge=0, description="β of eq. 1; 0 skips the reference model")
    kl_log_ratio_clip: float = Field(
        default=20.0, gt=0, description="|log π_ref/π| is clamped to this before the k3 exp (verl's value)")
    clip_eps_low: float = Field(default=0.2, gt=0, lt=1)
    clip_eps_high: float = Field(default=0.2, gt=0)
    advantage_std_ddof: Literal[0, 1] = 1
    advantage_eps: float = Field(default=1e-4, gt=0)
    scale_advantages_by_std: bool = True
    loss_aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean"
    )
    updates_per_batch: int = Field(default=1, ge=1, description="μ: optimisation passes per batch")
    off_policy_correction: Literal["auto", "none", "tis", "mis", "icepop", "geo_mask"] = Field(
        default="auto", description="weights for samples the rollout engine drew with other weights or another "
        "numeric stack (learner/grpo.py importance_weights); auto: tis when grpo.max_staleness_steps > 0, else none")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(default="k3", description="Schulman's estimator of "
                                                    "KL(π_θ || π_ref); the paper's eq. 2 is k3")
    kl_in: Literal["loss", "reward"] = Field(default="loss", description="loss: β·KL per token in the loss "
                                             "(DeepSeekMath, the paper); reward: β·Σ_t KL subtracted from each "
                                             "response's reward before the group advantages (PPO-RLHF style)")
    overlong: Literal["none", "mask", "penalty"] = Field(
        default="none", description="responses cut at rollout.max_new_tokens: mask drops them from the loss "
        "(DAPO's over-long filtering); penalty adds DAPO's soft over-long punishment to their reward")
    overlong_buffer_tokens: int = Field(default=0, ge=0, description="penalty: the last this many tokens of "
                                        "the budget ramp the penalty from 0 to -1 (0: a quarter of the budget)")
    is_cap: float = Field(default=2.0, ge=1, description="tis/mis: the largest importance weight")
    is_low: float = Field(default=0.5, gt=0, le=1, description="icepop/geo_mask: the lowest ratio kept")
    is_high: float = Field(default=2.0, ge=1, description="icepop/geo_mask: the highest ratio kept")
