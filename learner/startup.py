"""An actor's start-up without Python's cyclic garbage collector.

An actor's constructor imports torch, transformers, vLLM or DeepSpeed and builds a model:
millions of objects that live as long as the process, and next to no cyclic garbage. The
collector still walks that growing heap again and again (each pass over the oldest
generation costs more than the last), and the loaders call ``gc.collect()`` themselves (vLLM
five times while it builds an engine). Measured on this 2-core machine, one process
importing vLLM and building the demo's engine: 6.8-7.6 s of CPU with the collector on, 4.6 s
with it paused and the heap frozen before the build (``benchmarks/startup.py`` shows the
effect on a whole run: the first generation 11.3-13.7 s after the process starts, not 15-17).
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
_paused = 0  # start-up calls under way in this process


def _collect_in_child() -> None:
    """A process forked during a start-up (an engine's worker) collects as usual."""
    global _paused
    if _paused:
        _paused = 0
        gc.enable()


os.register_at_fork(after_in_child=_collect_in_child)


def gc_paused(*, freeze: bool) -> Callable[[F], F]:
    """Decorate an actor's start-up call (its constructor, a learner's ``setup``): the
    collector is off while it runs and back as it was after; a process forked meanwhile
    collects as usual.

    ``freeze``: also freeze the heap (``gc.freeze``: every object alive moves to a permanent
    generation that later collections skip) before the call and after it, so the loaders' own
    ``gc.collect()`` calls walk only what is new. For an actor that owns its process (vLLM
    freezes the engine's heap once it is built too, ``vllm.utils.gc_utils.freeze_gc_heap``):
    the cyclic garbage of the imports is then never freed, a few kilobytes. Not for objects
    built inside another program's process (a test's), whose garbage would stay too."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def paused(*args, **kwargs):
            global _paused
            was_on = gc.isenabled()
            gc.disable()
            _paused += 1
            try:
                if freeze:
                    gc.freeze()
                return fn(*args, **kwargs)
            finally:
                _paused -= 1
                if freeze:
                    gc.freeze()
                if was_on:
                    gc.enable()

        return paused  # type: ignore[return-value]

    return wrap
