"""Stage configuration: per-package models composed into one, loaded from YAML.

``load_config(path, overrides)`` reads a YAML file, applies ``key.sub=value`` overrides
(values parsed as YAML: ``loss.kl_coef=0``, ``run.name=exp1``), and validates. Any
error names the field and how to fix it, before any actor starts; a setting that moved
or was removed (``RETIRED``) is named with its new place or what to do instead.
"""

from __future__ import annotations

import warnings

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actors.config import ReferenceConfig, RolloutConfig
from learner.config import GRPOLossConfig, LearnerConfig
from rewards.config import RewardsConfig


class FrozenModel(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


_Frozen = FrozenModel


class RunConfig(_Frozen):
    name: str = Field(default="grpo", pattern=r"^[A-Za-z0-9._-]+$")
    storage: str = Field(default="runs", description="where everything the run writes goes, under "
                         "<storage>/<name>: a local path (relative: to the driver's working directory) or a URI "
                         "pyarrow.fs opens (file://, s3://, gs://); on several nodes, a path every node mounts "
                         "or a URI")
    seed: int = 0
    resume: bool = Field(default=False, description="continue from the run's last checkpoint")
    overwrite: bool = Field(default=False, description="a run of this name exists: move it aside to "
                            "<name>.replaced-<time> (never deleted) and start afresh")
    max_restarts: int = Field(default=3, ge=0, description="how often a lost rollout, reward, reference or "
                              "reward-model actor is restarted (each), and how often the learner group restarts "
                              "from the latest checkpoint, before the run gives up")
    hang_grace_s: float = Field(default=300.0, gt=0, description="added to every deadline on a remote result; "
                                "an actor past its deadline is named, its stack dumped, and it is restarted")
    min_tokens_per_s: float = Field(default=50.0, gt=0, description="the slowest generation or learner speed "
                                    "(tokens/s per actor) that is not a hang: sizes the deadlines")

    @model_validator(mode="after")
    def _one_way(self) -> RunConfig:
        if self.resume and self.overwrite:
            raise ValueError("run.resume and run.overwrite are both set: resume continues the run, overwrite "
                             "moves it aside and starts afresh; choose one")
        return self

    @property
    def location(self) -> str:
        """``<storage>/<name>`` as configured; ``orchestrator.storage.for_run`` resolves it
        on the driver."""
        from orchestrator.storage import join

        return join(self.storage, self.name)


class ModelConfig(_Frozen):
    path: str = Field(description="HF model directory: a path, a URI pyarrow.fs opens (staged once per node), "
                      "or a hub id where the hub is reachable")
    trust_remote_code: bool = False


class DataConfig(_Frozen):
    train_path: str = Field(description="a .jsonl, .json or .parquet file, or a datasets save_to_disk folder "
                            "(a path, or a URI pyarrow.fs opens: read on the driver)")
    split: str | None = Field(default=None, description="the split to read from a path that holds several "
                              "(a saved DatasetDict, or a folder of train.parquet, test.jsonl, ...)")
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    kind_key: str = Field(default="kind", description="field naming a row's prompt type (§2.3.4)")
    default_kind: str = Field(default="reasoning", description="prompt type of rows without kind_key")
    kind_weights: dict[str, float] | None = Field(
        default=None, description="sampling weight per prompt type, e.g. {reasoning: 3, general: 1}; "
        "None: prompts drawn uniformly")
    template: Literal["r1zero", "plain", "chat"] = "r1zero"
    shuffle: bool = True
    skip_bad_rows: bool = Field(default=False, description="skip rows that are not usable (not UTF-8, not a "
                                "JSON object, a field missing, a prompt too long) instead of refusing the data; "
                                "they are counted in the run's data_report.json")

    @field_validator("kind_weights")
    @classmethod
    def _weights(cls, w: dict[str, float] | None) -> dict[str, float] | None:
        if w is not None and (any(v < 0 for v in w.values()) or not any(v > 0 for v in w.values())):
            raise ValueError(f"kind_weights must be >= 0 with at least one > 0, got {w}")
        return w


class GRPOConfig(_Frozen):
    steps: int = Field(default=100, ge=1, description="optimizer steps")
    prompts_per_step: int = Field(default=8, ge=1, description="B")
    samples_per_prompt: int = Field(default=16, ge=2, description="G (paper: a group per question)")
    max_staleness_steps: int = Field(
        default=0, ge=0, description="how many steps generation may run ahead; 0 = on-policy"
    )
    partial_rollout: bool = Field(
        default=False, description="a weight push lands between two engine steps: samples in flight stop, the "
        "engine loads the new weights and continues them from their tokens so far (each token records the "
        "version that drew it); without it a push waits for the generation in flight")
    filter_zero_variance: bool = Field(
        default=False, description="DAPO's dynamic sampling: groups whose rewards are all equal (no learning "
        "signal) are dropped and more prompts sampled until the step has prompts_per_step informative groups")
    max_sampling_rounds: int = Field(default=3, ge=1, description="with filter_zero_variance: rounds of "
                                     "generation a step may take; then zero-variance groups fill the rest")
    checkpoint_every_steps: int = Field(default=0, ge=0, description="a checkpoint every this many steps; 0 = off")
    checkpoint_every_minutes: float = Field(
        default=30.0, ge=0, description="a checkpoint when this much wall time passed since the last; 0 = off "
        "(a stop, Ctrl-C or SIGTERM always writes one)")
    keep_checkpoints: int = Field(default=2, ge=1, description="how many of the newest checkpoints are kept")


ROLE_NAMES = ("learner", "rollout", "reference", "reward", "reward_model")  # orchestrator.placement.ROLES
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class RoleConfig(_Frozen):
    """Where one role's actors may run: Ray resources added to each of its bundles (or to
    the actor itself where it has no bundle), e.g. ``{node_a: 0.01}`` for a custom
    resource a node was started with (``ray start --resources``) or
    ``{"accelerator_type:H100": 0.001}`` for the label Ray gives GPU nodes."""

    resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        builtin = sorted(set(v) & set(RAY_BUILTIN_RESOURCES))
        if builtin:
            raise ValueError(f"{builtin} are set by cluster.cpus_per_actor / cluster.gpus_per_*; "
                             "cluster.roles.<role>.resources names custom resources only")
        bad = sorted(k for k, amount in v.items() if not k or amount <= 0)
        if bad:
            raise ValueError(f"resources {bad}: a name must be non-empty and its amount above 0")
        return v


class ClusterConfig(_Frozen):
    """How many actors of each role, and their resources. These numbers are read by
    orchestrator/placement.py only; a stage uses the counts of the roles it starts."""

    address: str | None = Field(default=None, description="Ray address; None = RAY_ADDRESS or a local cluster")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs for an embedded local cluster")
    dashboard: bool = Field(default=True, description="an embedded local cluster starts Ray's dashboard "
                            "(http://127.0.0.1:8265: rollout throughput, logs); false starts Ray about 1.5-2 s "
                            "sooner on a 2-core machine. A cluster joined by address keeps its own")
    learner_workers: int = Field(default=1, ge=1, description="DeepSpeed data-parallel ranks (L)")
    rollout_engines: int = Field(default=1, ge=1, description="rollout actors (R), each of "
                                 "rollout.tensor_parallel_size GPUs")
    reward_actors: int = Field(default=1, ge=1, description="reward actors (W) per reward set")
    gpus_per_rollout_engine: float = Field(default=0, ge=0)
    gpus_per_learner: float = Field(default=0, ge=0)
    gpus_per_reference: float = Field(default=0, ge=0)
    gpus_per_reward_model: float = Field(default=0, ge=0, description="for rewards.reward_models (§2.3.4)")
    cpus_per_actor: float = Field(default=0.5, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="of the learner ranks, reference and reward model (each rollout "
        "engine's bundles are a group of their own on one node)")
    colocate_reference_with_learner: bool = True
    colocate_rollout_with_learner: bool = Field(
        default=False, description="rollout engine i shares learner rank i's bundle (GPU) and they take turns: "
        "the engine sleeps while the ranks train (vLLM sleep mode on GPUs; nothing to free on CPUs); grpo only, "
        "on-policy, one engine per rank, tensor_parallel_size 1")
    autoscaling: bool = Field(default=False, description="the cluster adds nodes on demand (KubeRay autoscaler): "
                              "a plan the present nodes cannot hold is waited for (with progress lines) instead "
                              "of refused at once")
    roles: dict[str, RoleConfig] = Field(default_factory=dict, description="per role: the nodes it may use, "
                                         "by custom resources (cluster.roles.learner.resources)")

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, v: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        unknown = sorted(set(v) - set(ROLE_NAMES))
        if unknown:
            raise ValueError(f"unknown roles {unknown} in cluster.roles; roles are {', '.join(ROLE_NAMES)}")
        return v


class LoggingConfig(_Frozen):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "r1lab"
    progress: bool = True


def check_room_for_prompt(max_new_tokens: int, rollout: RolloutConfig, what: str = "rollout.max_new_tokens") -> None:
    """A sequence is prompt + response: the response limit must leave room for a prompt."""
    if max_new_tokens >= rollout.max_model_len:
        raise ValueError(f"{what} ({max_new_tokens}) must be below rollout.max_model_len "
                         f"({rollout.max_model_len}) to leave room for the prompt")


class GRPOStageConfig(_Frozen):
    """Everything the ``grpo`` stage needs."""

    run: RunConfig = RunConfig()
    model: ModelConfig
    data: DataConfig
    grpo: GRPOConfig = GRPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    reference: ReferenceConfig = ReferenceConfig()
    learner: LearnerConfig = LearnerConfig()
    loss: GRPOLossConfig = GRPOLossConfig()
    rewards: RewardsConfig = RewardsConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> GRPOStageConfig:
        b, l, m = self.grpo.prompts_per_step, self.cluster.learner_workers, self.learner.micro_batch_groups
        if b % l:
            raise ValueError(
                f"grpo.prompts_per_step ({b}) must be a multiple of cluster.learner_workers ({l}) "
                "so every rank trains on the same number of groups"
            )
        if (b // l) % m and not self.learner.max_tokens_per_micro_batch:  # packing does not count groups
            raise ValueError(
                f"groups per rank ({b // l}) must be a multiple of learner.micro_batch_groups ({m})"
            )
        check_room_for_prompt(self.rollout.max_new_tokens, self.rollout)
        if self.cluster.colocate_rollout_with_learner:
            self._check_colocated()
        if self.grpo.partial_rollout and not self.grpo.max_staleness_steps:
            warnings.warn("grpo.partial_rollout has nothing to interrupt with grpo.max_staleness_steps=0 (a push "
                          "lands before the next step's generation starts); set grpo.max_staleness_steps >= 1",
                          stacklevel=2)
        return self

    def _check_colocated(self) -> None:
        c, wrong = self.cluster, []
        if self.grpo.max_staleness_steps or self.grpo.partial_rollout:
            wrong.append("engines and learner ranks take turns on one device, so generation cannot run ahead: set "
                         "grpo.max_staleness_steps=0 and grpo.partial_rollout=false")
        if c.rollout_engines != c.learner_workers:
            wrong.append(f"one engine shares each learner rank's device: set cluster.rollout_engines to "
                         f"cluster.learner_workers ({c.learner_workers})")
        if self.rollout.tensor_parallel_size != 1:
            wrong.append("a co-located engine runs on its rank's one device: set rollout.tensor_parallel_size=1")
        if wrong:
            raise ValueError("cluster.colocate_rollout_with_learner: " + "; ".join(wrong))

    @property
    def off_policy_correction(self) -> str:
        """``loss.off_policy_correction`` with ``auto`` decided: TIS when generation runs
        ahead of learning, none on-policy."""
        mode = self.loss.off_policy_correction
        if mode == "auto":
            return "tis" if self.grpo.max_staleness_steps > 0 else "none"
        return mode

    @property
    def groups_per_rank(self) -> int:
        return self.grpo.prompts_per_step // self.cluster.learner_workers

    @property
    def use_reference(self) -> bool:
        return self.loss.kl_coef > 0


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and how to fix it."""


# Settings that moved (old key -> new key) or were removed (key -> what to do instead).
# Checked before validation, in the file and in overrides, so an old config fails with
# the new name rather than "unknown setting".
_LOSS_FIELDS = ("kl_coef", "clip_eps_low", "clip_eps_high", "advantage_std_ddof", "advantage_eps",
                "scale_advantages_by_std", "loss_aggregation", "updates_per_batch")
MOVED: dict[str, str] = {
    "learner.num_workers": "cluster.learner_workers",
    "rollout.num_engines": "cluster.rollout_engines",
    "cluster.num_reward_actors": "cluster.reward_actors",
    "run.output_dir": "run.storage",
    **{f"learner.{name}": f"loss.{name}" for name in _LOSS_FIELDS},
}
REMOVED: dict[str, str] = {
    "grpo.eval_every_steps": "no evaluation ever ran during training; delete it and evaluate the "
    "checkpoint with the eval stage (`r1lab run eval`, or an eval step in a pipeline)",
    "logging.log_samples_every_steps": "no samples were ever logged; delete it (the eval and sample "
    "stages write every completion: samples.jsonl, sft.jsonl)",
    "data.test_path": "no stage read it; delete it and give held-out data to the eval stage "
    "(eval.benchmarks)",
}


def _has_setting(model: type[BaseModel], key: str) -> bool:
    section, _, name = key.partition(".")
    field = model.model_fields.get(section)
    sub = field.annotation if field is not None else None
    return isinstance(sub, type) and issubclass(sub, BaseModel) and name in sub.model_fields


def retired_message(key: str, model: type[BaseModel]) -> str | None:
    """What to do about ``key`` if it moved or was removed (only where ``model`` has its old
    section); None for any other key."""
    section = key.partition(".")[0]
    if section not in model.model_fields:
        return None
    if key in MOVED:
        new = MOVED[key]
        if _has_setting(model, new):
            return f"{key} moved to {new}"
        return f"{key} moved to {new}, which this stage does not have (a grpo setting): delete it"
    if key in REMOVED:
        return f"{key} was removed: {REMOVED[key]}"
    return None


def check_retired(raw: dict[str, Any], overrides: list[str], model: type[BaseModel], source: str) -> None:
    """Refuse moved or removed settings in the file and in ``key=value`` overrides."""
    lines = []
    for key in (*MOVED, *REMOVED):
        section, _, name = key.partition(".")
        msg = retired_message(key, model)
        if msg and isinstance(raw.get(section), dict) and name in raw[section]:
            lines.append(f"  {msg}")
    for item in overrides:
        key, _, value = item.partition("=")
        msg = retired_message(key, model)
        if msg:
            fix = f"; write {MOVED[key]}={value}" if key in MOVED and _has_setting(model, MOVED[key]) else ""
            lines.append(f"  override {item!r}: {msg}{fix}")
    if lines:
        raise ConfigError(f"config {source} uses settings that moved or were removed:\n" + "\n".join(lines))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (values parsed as YAML). A numeric
    part indexes a list: ``rewards.reward_models.0.path=/models/rm``."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node: Any = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                                      f"{part!r} is not an index of it")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last:
                    node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {parts[i - 1]!r} is a value, not a section")
            if last:
                node[index] = yaml.safe_load(value) if value != "" else ""
            else:
                node = node[index]
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def validate(model: type[BaseModel], raw: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            if e["type"] == "extra_forbidden":
                retired = retired_message(where, model)
                lines.append(f"  {retired}" if retired else f"  {where}: unknown setting (check its spelling and section)")
            elif not e["loc"]:
                lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            elif e["type"] == "missing":
                lines.append(f"  {where}: required, set it in the file or as {where}=...")
            else:
                lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None


def load_config(path: Path, overrides: list[str] | None = None, model: type[BaseModel] = GRPOStageConfig) -> Any:
    raw = read_yaml(path)
    check_retired(raw, list(overrides or []), model, str(path))
    raw = apply_overrides(raw, list(overrides or []))
    return validate(model, raw, str(path))


def dump_config(config: BaseModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
