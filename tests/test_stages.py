"""stages: the per-stage clock's peak RSS and the RSS reading that scripts/trace_memory.py samples."""

import numpy as np

from mcsharp_gguf import stages
from mcsharp_gguf.stages import StageClock, rss_mb

MB = 1 << 20


def test_rss_mb_sees_an_allocation_come_and_go():
    before = rss_mb()
    block = np.ones(300 * MB, dtype=np.uint8)  # written, so every page is resident
    held = rss_mb()
    del block
    after = rss_mb()
    assert held - before > 250
    assert held - after > 250  # numpy returns a block this large to the OS at once


def test_stage_peak_includes_a_transient_allocation_and_resets_between_stages():
    clock = StageClock(log=lambda _: None)
    with clock.stage("big"):
        block = np.ones(400 * MB, dtype=np.uint8)
        del block
    with clock.stage("small"):
        pass
    big, small = clock.stages
    assert big.peak_rss_mb - rss_mb() > 300  # the 400 MB was resident inside "big", gone now
    if stages._reset_peak():  # Linux lets a process reset its high-water mark: "small" does not inherit "big"'s
        assert small.peak_rss_mb < big.peak_rss_mb - 300
    else:  # elsewhere each stage reports the process's peak so far
        assert small.peak_rss_mb == big.peak_rss_mb
