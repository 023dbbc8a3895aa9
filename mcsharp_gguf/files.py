"""Files appear whole or not at all: outputs and work-dir entries are written under a temporary name and renamed
into place; a failed write (a full disk, a kill) removes its temporary file, and a killed writer's leftovers are
removed by the next run."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def remove_stale_parts(out: Path) -> list[Path]:
    """Remove the temp files (``.OUT.*.part``) a killed writer of ``out`` left behind. A live writer holds a lock
    on its temp file (atomic_output), so a concurrent run's file is left alone. Returns what was removed."""
    removed = []
    for part in (out.parent if str(out.parent) else Path(".")).glob(f".{out.name}.*.part"):
        try:
            with open(part, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                part.unlink()
                removed.append(part)
        except OSError:  # locked by a live writer, or gone already
            continue
    return removed


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temp path beside ``out``; rename it over ``out`` only if the block succeeds. The temp file is
    locked while the block runs (remove_stale_parts, run first, leaves it alone)."""
    remove_stale_parts(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".part")
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a result file gets normal permissions
        os.replace(tmp_path, out)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path`` (work-dir entries, state files): a stop midway leaves the
    old ``path`` or none, and a failed write (ENOSPC) leaves no ``tmp`` behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if not isinstance(e, OSError) and _disk_full(path.parent):
            # torch.save reports a full disk as a RuntimeError ("unexpected pos …") without an errno
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _disk_full(directory: Path) -> bool:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize < 1 << 20
