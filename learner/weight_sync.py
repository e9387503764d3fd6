"""Weight push from learner rank 0 to the rollout engines over a dedicated group.

The group is standalone (its own TCPStore), independent of the learners' DeepSpeed group
and of each engine's own parallel groups: gloo on CPU, NCCL on GPU. Rank 0 is learner
rank 0; engine workers take ranks 1.. . Every push sends the same ordered list of tensors
(``WeightSpec``), packed into buckets of at most ``bucket_bytes`` of one dtype; each
bucket is one flat broadcast. Receivers yield ``(name, tensor)`` per bucket so the engine
can load them as they arrive.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


class EnginePushFailed(RuntimeError):
    """An engine of the group did not take a push (it died, failed or was late):
    ``engine`` is its index among the rollout actors; ``late``: it did not answer in time."""

    def __init__(self, engine: int, message: str, late: bool = False) -> None:
        super().__init__(message)
        self.engine = engine
        self.late = late

    def __reduce__(self):  # raised in one process, read in another
        return type(self), (self.engine, str(self), self.late)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "torch.float32"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class WeightSpec:
    """The tensors a push sends, in order, and how they are bucketed."""

    tensors: tuple[TensorSpec, ...]
    bucket_bytes: int

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> WeightSpec:
        specs = tuple(TensorSpec(n, tuple(t.shape), str(t.dtype)) for n, t in named)
        unknown = {s.dtype for s in specs} - _DTYPES.keys()
        if unknown:
            raise TypeError(f"cannot push tensors of dtype {sorted(unknown)}")
        return cls(specs, bucket_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.tensors)

    def buckets(self) -> list[tuple[int, ...]]:
        """Index groups: consecutive tensors of one dtype, at most bucket_bytes each
        (a single larger tensor gets a bucket of its own)."""
        out: list[tuple[int, ...]] = []
        current: list[int] = []
        size = 0
        for i, s in enumerate(self.tensors):
            new_dtype = current and self.tensors[current[0]].dtype != s.dtype
            if current and (new_dtype or size + s.nbytes > self.bucket_bytes):
                out.append(tuple(current))
                current, size = [], 0
            current.append(i)
            size += s.nbytes
        if current:
            out.append(tuple(current))
        return out

    def allocate(self, device: torch.device | str) -> list[torch.Tensor]:
        """One flat buffer per bucket, to reuse across pushes: fresh memory for every
        push costs page faults that take longer than the copy itself."""
        return [
            torch.empty(sum(self.tensors[i].numel for i in idx), dtype=_DTYPES[self.tensors[idx[0]].dtype],
                        device=device)
            for idx in self.buckets()
        ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray, loopback is right
        return "127.0.0.1"


def create_group(host: str, port: int, rank: int, world_size: int, *, backend: str,
                 timeout_s: float = 600.0) -> dist.ProcessGroup:
    """A process group of its own over a fresh TCPStore (rank 0 hosts the store)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    prefix = dist.PrefixStore("r1lab-weights", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
    raise ValueError(f"weight-push backend must be gloo or nccl, got {backend!r}")


def _broadcast_async(group: dist.ProcessGroup, tensor: torch.Tensor):
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([tensor], opts)


def send_weights(group: dist.ProcessGroup, spec: WeightSpec, tensors: list[torch.Tensor],
                 buffers: list[torch.Tensor] | None = None) -> int:
    """Rank 0: broadcast ``tensors`` (in ``spec`` order) bucket by bucket; returns bytes.

    All buckets are posted at once (the backend sends them in order) so that receivers can
    load bucket i while bucket i+1 is on the wire.
    """
    if len(tensors) != len(spec.tensors):
        raise ValueError(f"{len(tensors)} tensors for a spec of {len(spec.tensors)}")
    sent, inflight = 0, []
    for k, idx in enumerate(spec.buckets()):
        parts = [tensors[i].detach().reshape(-1) for i in idx]
        if buffers is not None:
            flat = torch.cat(parts, out=buffers[k])
        else:
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        inflight.append((_broadcast_async(group, flat), flat))
        sent += flat.numel() * flat.element_size()
    for work, _ in inflight:
        work.wait()
    return sent


def receive_weights(group: dist.ProcessGroup, spec: WeightSpec, device: torch.device | str,
                    buffers: list[torch.Tensor] | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Ranks > 0: yield each bucket's ``(name, tensor)`` pairs as it arrives; the next
    bucket is already being received while the caller loads this one. The yielded
    tensors are views of ``buffers`` (when given): copy them before the next push."""
    buckets = spec.buckets()
    if buffers is None:
        buffers = spec.allocate(device)

    def post(k: int):
        return _broadcast_async(group, buffers[k]), buffers[k]

    ahead = post(0) if buckets else None
    for k, idx in enumerate(buckets):
        work, flat = ahead
        work.wait()
        ahead = post(k + 1) if k + 1 < len(buckets) else None
        out, offset = [], 0
        for i in idx:
            s = spec.tensors[i]
            out.append((s.name, flat[offset : offset + s.numel].view(s.shape)))
            offset += s.numel
        yield out
