"""stages: the per-stage clock's peak RSS and the RSS reading that scripts/trace_memory.py samples."""

import mmap
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from mcsharp_gguf import stages
from mcsharp_gguf.stages import StageClock, rss_mb

MB = 1 << 20


@contextmanager
def resident_block(mb: int) -> Iterator[None]:
    """``mb`` MB of anonymous pages of our own, every page written, unmapped on exit. Not numpy/malloc: late in a
    long test session (CI, 2026-12-07) glibc kept a freed 300 MB numpy block resident, so a reading that did not
    drop said nothing about the reader."""
    block = mmap.mmap(-1, mb * MB)
    view = np.frombuffer(block, dtype=np.uint8)
    view[::mmap.PAGESIZE] = 1
    try:
        yield
    finally:
        del view
        block.close()


def test_rss_mb_sees_an_allocation_come_and_go():
    before = rss_mb()
    with resident_block(300):
        held = rss_mb()
    after = rss_mb()
    assert held - before > 250
    assert held - after > 250


def test_stage_peak_includes_a_transient_allocation_and_resets_between_stages():
    clock = StageClock(log=lambda _: None)
    with clock.stage("big"), resident_block(400):
        pass
    with clock.stage("small"):
        pass
    big, small = clock.stages
    assert big.peak_rss_mb - rss_mb() > 300  # the 400 MB was resident inside "big", gone now
    if stages._reset_peak():  # Linux lets a process reset its high-water mark: "small" does not inherit "big"'s
        assert small.peak_rss_mb < big.peak_rss_mb - 300
    else:  # elsewhere each stage reports the process's peak so far
        assert small.peak_rss_mb == big.peak_rss_mb
