"""Where a layer's per-expert work runs (``--ray``): in this process, or as Ray tasks on a cluster.

The layer loop stays in this process and sequential (each layer calibrates on the quantised output of the one
before it); inside a layer, each expert's work (its errors at every candidate type in the importance pass, its
GPTQ in the quantisation pass) depends only on its own weights and tokens, so it can run anywhere. A Ray task runs
the same function on the same inputs with this process's torch thread count, so a conversion on a cluster writes
the bytes a one-process conversion writes (torch's CPU sums depend on the thread count, not on where they run).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import McsharpError
from .nested import map_arrays

RETRIES = 3  # a task whose worker dies (killed, out of memory, node lost) runs again, at most this many times


class InProcess:
    """Every expert's work in this process, one after the other (the default)."""

    remote = False

    def map(self, fn: Callable, items: Iterable, **shared) -> Iterator:
        """``fn(item, **shared)`` of each item, in order."""
        for item in items:
            yield fn(item, **shared)

    def layer_device(self, device: torch.device, auto: bool) -> torch.device:
        """Where the layer loop runs beside this executor: ``device``."""
        return device

    def describe(self) -> str:
        return "this process"

    def close(self) -> None:
        pass


def _own_storage(obj: Any) -> Any:
    """``obj`` with every tensor that is a view into a larger one copied out: a pickled view carries its whole
    storage (an expert's slice of a layer's stacked experts would ship all of them)."""

    def own(a):
        if isinstance(a, torch.Tensor) and a.untyped_storage().nbytes() > a.numel() * a.element_size():
            return a.clone()
        return a

    return map_arrays(obj, own)


def _run_task(fn: Callable, threads: int, item, **shared):
    """A Ray task's body: ``fn`` with the driver's torch thread count (the same sums, so the same bits)."""
    torch.set_num_threads(threads)
    return fn(item, **shared)


class RayCluster:
    """Every expert's work as a Ray task on a cluster (``connect``), ``window`` tasks in flight at a time; results
    come back in order. A task whose worker dies is retried (RETRIES)."""

    remote = True

    def __init__(self, ray_module, threads: int, window: int, where: str):
        self._ray, self.threads, self.window, self.where = ray_module, threads, window, where
        self._task = ray_module.remote(num_cpus=threads, max_retries=RETRIES, retry_exceptions=False)(_run_task)

    def map(self, fn: Callable, items: Iterable, **shared) -> Iterator:
        """``fn(item, **shared)`` of each item as a Ray task (``shared`` put in the object store once), in
        order; at most ``window`` items are shipped ahead of the one being waited for."""
        ray = self._ray
        refs = {k: ray.put(_own_storage(v)) for k, v in shared.items()}
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self._task.remote(fn, self.threads, _own_storage(item), **refs))
                if len(pending) >= self.window:
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        finally:
            for ref in pending:  # an error (or a caller that stopped early): nothing left running for nothing
                ray.cancel(ref, force=True)

    def _get(self, ref):
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as e:  # the task's own error (not retried: it would recur)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            if isinstance(cause, McsharpError):
                raise McsharpError(first) from None
            raise McsharpError(f"an expert task failed on the Ray cluster {self.where}: {type(cause).__name__}: "
                               f"{first}; finished layers are kept in the work dir, so a rerun resumes") from None
        except self._ray.exceptions.RayError as e:  # its worker or node lost more often than RETRIES
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise McsharpError(f"a Ray task failed after {RETRIES} retries on {self.where}: {first}; finished "
                               "layers are kept in the work dir, so a rerun resumes") from None

    def layer_device(self, device: torch.device, auto: bool) -> torch.device:
        """Where the layer loop runs beside the cluster: the CPU (its tasks compute on CPUs, and a task's inputs
        and results cross processes as CPU tensors); ``--device auto`` falls back to it, a GPU asked for by
        name is an error."""
        if device.type == "cpu" or auto:
            return torch.device("cpu")
        raise McsharpError(f"--ray runs the expert work on the cluster's CPUs and --device {device} asks for a GPU; "
                           "use one of them (on one machine with a GPU, --device cuda alone is the faster)")

    def describe(self) -> str:
        cpus = int(self._ray.cluster_resources().get("CPU", 0))
        nodes = sum(1 for n in self._ray.nodes() if n.get("Alive"))
        return (f"Ray cluster {self.where}: {nodes} node(s), {cpus} CPUs; each expert task on {self.threads} "
                f"thread(s), up to {self.window} in flight")

    def close(self) -> None:
        self._ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error unless a TCP connection to ``address`` (host:port, or ray://host:port) opens."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise McsharpError(f"--ray {address}: expected auto or HOST:PORT of a Ray head node (e.g. 10.0.0.5:6379, "
                           "what `ray start --head` prints)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise McsharpError(f"--ray {address}: cannot reach a Ray cluster there ({e.strerror or e}); start one with "
                           f"`ray start --head --port {port}` on {host}, or check the address") from None


def _use_token_if_any() -> None:
    """Send a Ray auth token when there is one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and
    RAY_AUTH_MODE is unset: Ray ≥ 2.59 starts clusters with token authentication, and a driver that joins one by
    address sends no token unless told to (a cluster without authentication ignores it). Ray reads this when it
    is imported: a program that imported it already sets RAY_AUTH_MODE=token itself."""
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                                              or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"  # (read by Ray's client in ray.init)


def connect(address: str | None, threads: int | None = None) -> InProcess | RayCluster:
    """The executor of ``--ray``: None → InProcess; ``auto`` → the Ray cluster ``RAY_ADDRESS`` names or one
    running on this machine (``ray start --head``), else a new one on this machine's CPUs; ``HOST:PORT`` → the
    cluster whose head node listens there (checked before any work: an unreachable address is a one-line error).

    Each task runs on ``threads`` torch threads (default: this process's), fewer only where no node has that
    many CPUs."""
    if address is None:
        return InProcess()
    if address != "auto":
        _check_reachable(address)
        _use_token_if_any()  # (before Ray is imported: it reads its settings then)
    try:
        import ray
    except ImportError:
        raise McsharpError("--ray needs Ray: pip install 'mcsharp-gguf[ray]' (or pip install ray)") from None
    threads = threads or torch.get_num_threads()
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    if address == "auto":
        try:
            ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
            where = "found running"
        except ConnectionError:
            ray.init(**quiet)
            where = "started on this machine"
    else:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 — ray raises several kinds for a port that is not a Ray head
            raise McsharpError(f"--ray {address}: could not join a Ray cluster there ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); a cluster with token authentication "
                               "needs its token here: RAY_AUTH_TOKEN, or ~/.ray/auth_token (`ray get-auth-token` on "
                               "its head node)") from None
        where = address
    per_node = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if max(per_node, default=0) < 1:
        ray.shutdown()
        raise McsharpError(f"--ray {address}: the cluster has no CPUs to run tasks on")
    if max(per_node) < threads:
        logging.getLogger(__name__).warning(
            "no node of the Ray cluster has %d CPUs: expert tasks run on %d threads (the file can then differ in "
            "the last bits from a one-process conversion on %d)", threads, max(per_node), threads)
        threads = max(per_node)
    window = 2 * max(1, sum(per_node) // threads)
    return RayCluster(ray, threads, window, where)
