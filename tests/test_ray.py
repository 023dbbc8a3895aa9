"""--ray: a layer's per-expert work as Ray tasks on a real local cluster (127.0.0.1), byte-identical to one process,
also when a worker is killed mid-task; an unreachable address is a one-line error before any work."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="pip install 'mcsharp-gguf[ray]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_before_work(tmp_path):
    """Nothing listens on the port: exit 2 with one line naming the address and the fix, in seconds (the
    address is tried before the checkpoint is even opened), no file."""
    out = tmp_path / "o.gguf"
    for address, says in ((f"127.0.0.1:{_free_port()}", "cannot reach a Ray cluster there"),
                          ("no-port-here", "expected auto or HOST:PORT")):
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "convert", str(tmp_path / "model"), "-o",
                              str(out), "--ray", address], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert says in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and time.monotonic() - t0 < 30 and not out.exists()


def test_ray_with_a_named_gpu_is_refused():
    from mcsharp_gguf.errors import McsharpError
    from mcsharp_gguf.executors import InProcess, RayCluster

    cluster = RayCluster.__new__(RayCluster)  # (layer_device needs no connection)
    assert cluster.layer_device(torch.device("cpu"), False) == torch.device("cpu")
    assert cluster.layer_device(torch.device("cuda", 0), True) == torch.device("cpu")  # --device auto
    with pytest.raises(McsharpError, match="--ray runs the expert work on the cluster's CPUs"):
        cluster.layer_device(torch.device("cuda", 0), False)
    assert InProcess().layer_device(torch.device("cuda", 0), False) == torch.device("cuda", 0)


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray cluster on 127.0.0.1 with 2 CPUs (`ray start --head`), its address; stopped afterwards."""
    from mcsharp_gguf.dev.ray_head import local_ray_head

    with local_ray_head(2) as address:
        yield address


def _task_pids() -> list[int]:
    """Ray worker processes running one of our tasks now (Ray titles a worker ray::<function> while it runs)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::_run_task"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


class _KillOneWorker(threading.Thread):
    """Kills (SIGKILL) the first worker seen running a task, once."""

    def __init__(self):
        super().__init__(daemon=True)
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for pid in _task_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
                    break
                except ProcessLookupError:
                    continue
            time.sleep(0.005)


def _convert(model: Path, out: Path, *ray: str) -> str:
    """`mcsharp convert` of ``model`` (a compressed conversion with OTP routers), as a user runs it; its sha256."""
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "convert", str(model), "-o", str(out), "--bpw",
                          "3.5", "--otp", "--calib-seqs", "4", "--calib-len", "64", "--device", "cpu", *ray],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.slow  # (tiny_model: the SmolLM2 tokenizer, pinned converter)
@pytest.mark.parametrize("kill", [False, True], ids=["plain", "worker-killed"])
def test_ray_conversion_is_byte_identical(tiny_model, tmp_path, ray_head, kill):
    """Importance (every type on a sample of 16 of the 32 experts, the rest predicted; starved experts on the pooled
    Hessian), stock plan, GPTQ and OTP with each expert's work as a Ray task on a cluster given by address: the
    one-process file, byte for byte; with a worker killed mid-task too (Ray runs the task again)."""
    model = tiny_model("qwen3moe", hidden=128, n_expert=32, top_k=4, expert_ff=128)
    here = _convert(model, tmp_path / "here.gguf")
    killer = _KillOneWorker()
    if kill:
        killer.start()
    try:
        there = _convert(model, tmp_path / "ray.gguf", "--ray", ray_head)
    finally:
        killer.stop.set()
    assert there == here
    if kill:
        assert killer.killed is not None, "no task was caught running"


@pytest.mark.slow  # (starts Ray: ~10 s)
def test_results_come_back_in_order_and_a_task_error_is_one_line():
    """executors.RayCluster.map on a cluster of this machine: results in item order; an error raised inside a
    task (not retried: it would recur) is the one-line error the same call gives in one process."""
    from mcsharp_gguf.devices import resolve_device
    from mcsharp_gguf.errors import McsharpError
    from mcsharp_gguf.executors import connect

    executor = connect("auto")
    try:
        assert list(executor.map(int, [str(i) for i in range(9)])) == list(range(9))
        with pytest.raises(McsharpError, match=r"^--device bogus: expected auto, cpu"):
            list(executor.map(resolve_device, ["cpu", "bogus"]))
        with pytest.raises(McsharpError, match="an expert task failed on the Ray cluster .*ValueError"):
            list(executor.map(int, ["x"]))
    finally:
        executor.close()
