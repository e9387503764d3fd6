"""``learner.startup.gc_paused``: the collector is off during an actor's start-up, back as it
was afterwards (also when the start-up fails), and on in a process forked meanwhile."""

from __future__ import annotations

import gc
import os

import pytest

from learner.startup import gc_paused


@pytest.fixture()
def collector_restored():
    was_on = gc.isenabled()
    yield
    gc.unfreeze()  # what a freeze=True call froze in this (the test's) process
    if was_on:
        gc.enable()
    else:
        gc.disable()


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("on_before", [True, False])
def test_the_collector_is_off_inside_and_as_before_after(collector_restored, freeze, on_before):
    gc.enable() if on_before else gc.disable()
    seen = []

    @gc_paused(freeze=freeze)
    def start_up(x, *, y):
        seen.append(gc.isenabled())
        return x + y

    assert start_up(1, y=2) == 3
    assert seen == [False]
    assert gc.isenabled() is on_before


def test_a_failing_start_up_still_turns_the_collector_back_on(collector_restored):
    gc.enable()

    @gc_paused(freeze=False)
    def start_up():
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        start_up()
    assert gc.isenabled()


def test_freeze_moves_what_is_alive_out_of_later_collections(collector_restored):
    gc.unfreeze()
    built, frozen_at_entry = [], []

    @gc_paused(freeze=True)
    def start_up():
        frozen_at_entry.append(gc.get_freeze_count())  # the heap as the start-up found it
        built.extend([{"layer": i}] for i in range(1000))

    start_up()
    assert frozen_at_entry[0] > 0
    assert gc.get_freeze_count() >= frozen_at_entry[0] + 1000  # and the 1000 lists it built


def test_a_process_forked_during_start_up_collects(collector_restored):
    gc.enable()
    read, write = os.pipe()

    @gc_paused(freeze=False)
    def start_up():
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once
            os.write(write, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        return gc.isenabled()

    assert start_up() is False  # the parent's collector stays off inside
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.close(write)
