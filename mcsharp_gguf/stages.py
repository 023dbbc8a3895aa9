"""Wall time and peak resident memory of each stage of a run (calibration, importance, MILP, GPTQ, write).

Each stage's peak is its own: on Linux the process's high-water mark (VmHWM) is reset when a stage starts
(``/proc/self/clear_refs``), so a later, smaller stage does not inherit an earlier stage's peak. Elsewhere the
peak is the process's peak so far.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _reset_peak() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(reset_ok: bool) -> float:
    if reset_ok:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StageTime:
    """One stage: its name, wall seconds and peak RSS (MB) while it ran."""

    stage: str
    wall_s: float
    peak_rss_mb: float


@dataclass
class StageClock:
    """Records stages in order; ``with clock.stage("gptq"): ...`` times one and logs a ``[stage]`` line."""

    log: Callable[[str], None] = print
    stages: list[StageTime] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        reset_ok = _reset_peak()
        t0 = time.perf_counter()
        yield
        st = StageTime(name, time.perf_counter() - t0, _peak_mb(reset_ok))
        self.stages.append(st)
        self.log(f"[stage] {name}: {st.wall_s:.1f} s, peak RSS {st.peak_rss_mb:.0f} MB")

    def to_json(self) -> list[dict]:
        return [asdict(s) for s in self.stages]
