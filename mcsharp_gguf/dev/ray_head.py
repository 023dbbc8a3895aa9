"""A throwaway Ray cluster on this machine, for tests and benchmarks of ``--ray`` (``pip install
'mcsharp-gguf[ray]'``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def local_ray_head(n_cpus: int, env: dict | None = None) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with ``n_cpus`` CPUs (``ray start --head``, no dashboard, no usage stats); yields
    its address for ``mcsharp convert --ray``; stopped (``ray stop --force``) on exit."""
    env = {**(os.environ if env is None else env), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    f"--num-cpus={n_cpus}", "--include-dashboard=false", "--disable-usage-stats"], check=True,
                   env=env, timeout=300, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, timeout=300, capture_output=True)
