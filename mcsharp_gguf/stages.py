"""Wall time and peak resident memory of each stage of a run (calibration, importance, MILP, GPTQ, write).

Each stage's peak is its own: on Linux the process's high-water mark (VmHWM) is reset when a stage starts
(``/proc/self/clear_refs``), so a later, smaller stage does not inherit an earlier stage's peak. Elsewhere the
peak is the process's peak so far. The reset also lowers what the kernel reports as the process's own peak
(``ru_maxrss`` seen by a parent): a process's true peak is the largest of its stages' (``StageClock.peak_mb``).
"""

from __future__ import annotations

import functools
import math
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

_ROLLUP = Path("/proc/self/smaps_rollup")
_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). Tensors freed in
    pieces below malloc's mmap threshold otherwise stay resident: at Mixtral-8x7B shape the importance pass left
    1.1 GB behind for GPTQ to start on. Called after each decoder layer and before each stage."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (looked up once), or None where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _reset_peak() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def _status_mb(key: str, path: Path | None = None) -> float:
    """One memory line of /proc/self/status (``VmRSS``, ``VmHWM``; or of ``path``) in MB; NaN where it cannot be
    read."""
    try:
        for line in (path or _STATUS).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_mb(reset_ok: bool) -> float:
    peak = _status_mb("VmHWM") if reset_ok else float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if math.isnan(peak) else peak


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
        release_free_memory()
        reset_ok = _reset_peak()
        t0 = time.perf_counter()
        yield
        st = StageTime(name, time.perf_counter() - t0, _peak_mb(reset_ok))
        self.stages.append(st)
        self.log(f"[stage] {name}: {st.wall_s:.1f} s, peak RSS {st.peak_rss_mb:.0f} MB")

    def peak_mb(self) -> float:
        """The largest peak of any stage (MB)."""
        return max((s.peak_rss_mb for s in self.stages), default=0.0)

    def to_json(self) -> list[dict]:
        return [asdict(s) for s in self.stages]


# A small launcher reports its child's peak RSS: a child forked straight from a large process would count that
# process's resident pages in its own peak (Linux carries the high-water mark across fork and exec).
_PEAK_RSS = ("import resource, subprocess, sys\n"
             "rc = subprocess.call(sys.argv[2:])\n"
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
             "sys.exit(rc)")


def run_with_peak_rss(cmd: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """Run ``cmd`` as its own process; (wall seconds, its peak RSS in MB, exit code, its stderr)."""
    import subprocess
    import sys
    import tempfile

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        peak, err = Path(tmp) / "peak", Path(tmp) / "stderr"
        with err.open("w") as f:  # a file, not a pipe: a chatty tool must not block on a full pipe
            rc = subprocess.call([sys.executable, "-c", _PEAK_RSS, str(peak), *cmd], stdout=subprocess.DEVNULL,
                                 stderr=f, env=env)
        rss = int(peak.read_text()) / 1024 if peak.exists() else 0.0
        return time.time() - t0, rss, rc, err.read_text()


def rss_mb() -> float:
    """Resident memory of this process now (MB; NaN where /proc is not there): counted page by page from
    /proc/self/smaps_rollup (~1 ms a 2 GB process), as /proc/self/status's VmRSS is the kernel's running counter
    and once, late in a long test session on kernel 6.18, did not move for a 300 MB block written just before."""
    got = _status_mb("Rss", _ROLLUP)
    return _status_mb("VmRSS") if math.isnan(got) else got


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
