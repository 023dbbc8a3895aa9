"""An OpenAI-compatible server on the patched runtime: llama-cpp-python's server (FastAPI/uvicorn, the
``[server]`` extra) with the pruning knobs, stricter request checks, and the executed expert-slot fraction
on ``/metrics``.

llama-cpp-python's server does the protocol (chat templates from the GGUF, streaming, ``/v1/models``,
OpenAI-style errors, one request on the model at a time). Ours adds what it lets through: a request for
another model is answered 404 (it would silently get this one), ``max_tokens`` < 1 and a body that is not a
JSON object are answered 400 (``-1`` would generate until the context is full), and streams are not cut
short when another client is waiting (its ``interrupt_requests`` default).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import McsharpError
from . import llama

# Request paths whose JSON body names a model and a token budget.
_MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class ServeOptions:
    """What ``mcsharp serve`` runs: one GGUF under one model name, with the runtime's pruning overrides."""

    model: Path
    alias: str
    n_ctx: int = 4096
    n_threads: int | None = None  # None: every core
    kv_overrides: dict[str, bool | int | float | str] = field(default_factory=dict)
    api_key: str | None = None


def _override_strings(kv: dict[str, bool | int | float | str]) -> list[str]:
    """kv_overrides in the server settings' ``KEY=TYPE:VALUE`` form."""
    out = []
    for key, value in kv.items():
        kind = ("bool" if isinstance(value, bool) else "int" if isinstance(value, int)
                else "float" if isinstance(value, float) else "str")
        out.append(f"{key}={kind}:{str(value).lower() if kind == 'bool' else value}")
    return out


def _error(status: int, message: str, code: str | None, param: str | None = None) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return status, json.dumps(body).encode()


def check_request(body: bytes, models: set[str]) -> tuple[int, bytes] | None:
    """An OpenAI-style (status, JSON error) for a request body llama-cpp-python would mishandle, else None."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return _error(400, f"the request body is not valid JSON: {e}", "invalid_json")
    if not isinstance(req, dict):
        return _error(400, "the request body must be a JSON object", "invalid_json")
    model = req.get("model")
    if model is not None and model not in models:
        return _error(404, f"The model `{model}` does not exist; this server has {', '.join(sorted(models))} "
                           "(GET /v1/models)", "model_not_found", "model")
    max_tokens = req.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        return _error(400, f"max_tokens must be a positive integer, not {max_tokens!r}", "invalid_value",
                      "max_tokens")
    return None


class RequestChecks:
    """ASGI middleware: buffer the body of a model request, answer it with :func:`check_request`'s error if
    it has one, else replay the body to the app."""

    def __init__(self, app, models: set[str]):
        self.app, self.models = app, models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _MODEL_ROUTES:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = check_request(body, self.models)
        if problem is not None:
            status, payload = problem
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def metrics_text() -> str:
    """Prometheus text: the runtime's expert-slot counter since the server started."""
    selected, executed = llama.read_slot_counter()
    frac = executed / selected if selected else math.nan
    return (
        "# HELP mcsharp_moe_slots_selected_total Expert slots the MoE routers chose (counted only while a "
        "pruning rule is active).\n"
        "# TYPE mcsharp_moe_slots_selected_total counter\n"
        f"mcsharp_moe_slots_selected_total {selected}\n"
        "# HELP mcsharp_moe_slots_executed_total Of those, the slots the runtime executed.\n"
        "# TYPE mcsharp_moe_slots_executed_total counter\n"
        f"mcsharp_moe_slots_executed_total {executed}\n"
        "# HELP mcsharp_moe_executed_fraction executed / selected (NaN before any slot was counted).\n"
        "# TYPE mcsharp_moe_executed_fraction gauge\n"
        f"mcsharp_moe_executed_fraction {'NaN' if math.isnan(frac) else f'{frac:.6f}'}\n"
    )


def create_server_app(opts: ServeOptions):
    """The ASGI app serving ``opts.model`` (loaded now, on the patched runtime's plain CPU buffers)."""
    if not opts.model.is_file():
        raise McsharpError(f"{opts.model}: no such GGUF file")
    llama.check_before_load(opts.model, opts.kv_overrides)
    llama_cpp = llama.llama_cpp_module()
    try:
        from fastapi.responses import PlainTextResponse
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise McsharpError(f"`mcsharp serve` needs the server extra ({e.name} is missing): "
                           "pip install 'mcsharp-gguf[server]'") from None
    server = ServerSettings(api_key=opts.api_key, interrupt_requests=False)
    threads = opts.n_threads or os.cpu_count() or 1
    model = ModelSettings(model=str(opts.model), model_alias=opts.alias, n_ctx=opts.n_ctx,
                          n_batch=min(opts.n_ctx, 512), n_ubatch=min(opts.n_ctx, 512), n_gpu_layers=0,
                          n_threads=threads, n_threads_batch=threads,
                          kv_overrides=_override_strings(opts.kv_overrides) or None, verbose=False)
    # create_app would replace both settings with the file named by $CONFIG_FILE
    config_file = os.environ.pop("CONFIG_FILE", None)
    llama.clear_llama_log()
    try:
        with llama.plain_cpu_buffers(llama_cpp):
            app = create_app(server_settings=server, model_settings=[model])
    except ValueError:
        raise llama.cannot_load(opts.model) from None
    finally:
        if config_file is not None:
            os.environ["CONFIG_FILE"] = config_file

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics_text(), media_type="text/plain; version=0.0.4")

    llama.reset_slot_counter()
    return RequestChecks(app, {opts.alias})


def run_server(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8080, log=print) -> tuple[int, int]:
    """Serve until SIGINT/SIGTERM; the (selected, executed) expert slots counted while serving."""
    import uvicorn

    try:  # before the model loads: uvicorn would only say so after, and exit 1
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as e:
        raise McsharpError(f"cannot listen on {host}:{port}: {e.strerror}; pass another --port or --host") from None
    app = create_server_app(opts)

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own re-raises SIGINT/SIGTERM after the graceful shutdown (exit 130/143, no summary);
            # a server stopped on request has done its job
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))
    log(f"serving {opts.model} as model '{opts.alias}' on http://{host}:{port}/v1 (Ctrl-C stops)")
    server.run()
    return llama.read_slot_counter()
