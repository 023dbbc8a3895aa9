"""`mcsharp serve` driven by the official `openai` client, and the `mcsharp_gguf.load` API.

The server runs as its own process (`mcsharp serve`, as a user starts it) on 127.0.0.1 and a free port. Its
answers are checked against the same model loaded in this process: greedy chat turns must be identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from mcsharp_gguf import load
from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.runtime import llama
from mcsharp_gguf.runtime.chat import open_chat_model, reply
from mcsharp_gguf.runtime.prune import prune_overrides
from mcsharp_gguf.runtime.serve import _override_strings, check_request

# Tests that take `model_file` (a tiny GGUF, the patched runtime) are marked slow by conftest.

MAX_TOKENS = 12
PROMPTS = ["Hello", "What is a list?", "Name a colour.", "Count to three."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`mcsharp serve PATH ARGS` on a free port; returns once /v1/models answers (or fails with its stderr)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mcsharp_gguf.cli", "serve", str(path), "--port", str(port),
                             "--ctx", "512", "--threads", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2):
                return proc, base
        except urllib.error.HTTPError:  # answering (e.g. 401 without the key): it is up
            return proc, base
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not answer within 120 s")


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("server did not stop within 30 s of SIGTERM")
    return proc.returncode, err


@pytest.fixture(scope="module")
def model_file(tiny_gguf) -> Path:
    return tiny_gguf("qwen2moe", "f16")  # top-2 routing, a chat template in the file


@pytest.fixture(scope="module")
def server(model_file):
    """One server for the module, pruned to 1 of the 2 routed slots (static k) so /metrics has a known value."""
    proc, base = _start(model_file, "--top-k", "1")
    yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    if proc.poll() is None:
        _stop(proc)


@pytest.fixture(scope="module")
def local_answers(model_file) -> dict[str, str]:
    """Greedy turns from the same file in this process, with the same pruning: what the server must say."""
    llm = open_chat_model(model_file, n_ctx=512, kv_overrides={"mcsharp.moe.prune_mode": 2,
                                                               "mcsharp.moe.static_k": 1})
    answers = {p: reply(llm, [{"role": "user", "content": p}], max_tokens=MAX_TOKENS) for p in PROMPTS}
    assert len(set(answers.values())) == len(PROMPTS) and all(answers.values()), answers  # else vacuous
    return answers


def _ask(client, prompt: str, stream: bool = False) -> str:
    # repeat_penalty: llama-cpp-python's server defaults to 1.1, a chat turn (and llama-server) to 1.0
    kw = dict(model="qwen2moe-f16.gguf", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
              temperature=0, extra_body={"repeat_penalty": 1.0})
    if not stream:
        res = client.chat.completions.create(**kw)
        assert res.choices[0].finish_reason in ("stop", "length")
        return res.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def test_models_chat_and_stream(server, local_answers):
    _, client = server
    assert [m.id for m in client.models.list().data] == ["qwen2moe-f16.gguf"]
    assert _ask(client, PROMPTS[0]) == local_answers[PROMPTS[0]]
    assert _ask(client, PROMPTS[1], stream=True) == local_answers[PROMPTS[1]]


def test_four_concurrent_clients_each_get_their_own_answer(server, local_answers):
    base, _ = server
    clients = [openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
               for _ in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda i: _ask(clients[i], PROMPTS[i], stream=i % 2 == 1), range(len(PROMPTS))))
    assert got == [local_answers[p] for p in PROMPTS]


def test_metrics_report_the_executed_fraction(server):
    base, client = server
    _ask(client, PROMPTS[2])
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = dict(line.split() for line in text.splitlines() if line and not line.startswith("#"))
    selected = int(values["mcsharp_moe_slots_selected_total"])
    executed = int(values["mcsharp_moe_slots_executed_total"])
    assert selected > 0 and executed * 2 == selected  # --top-k 1 of top-2
    assert float(values["mcsharp_moe_executed_fraction"]) == 0.5


def _raw_post(base: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_a_4xx_json_error_and_the_server_stays_up(server, local_answers):
    base, client = server
    msgs = [{"role": "user", "content": "Hello"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen2moe-f16.gguf", messages=msgs, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # ~100k tokens against a 512-token context
        client.chat.completions.create(model="qwen2moe-f16.gguf", max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 100_000}])
    assert e.value.body["code"] == "context_length_exceeded"
    for body in (b'{"messages": [{"role": "user"', b"[1, 2]", b"\xff\xfe"):
        status, err = _raw_post(base, body)
        assert 400 <= status < 500 and err["error"]["message"], (body, status, err)
    assert _ask(client, PROMPTS[0]) == local_answers[PROMPTS[0]]  # still up, still right


def test_api_key_public_host_warning_and_clean_shutdown(model_file):
    proc, base = _start(model_file, "--host", "0.0.0.0", "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == ["qwen2moe-f16.gguf"]
    finally:
        rc, err = _stop(proc)
    assert rc == 0, err
    assert "warning: --host 0.0.0.0" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "stopped"  # no pruning rule active: nothing counted
    with pytest.raises(OSError):  # the port is released
        urllib.request.urlopen(f"{base}/v1/models", timeout=2)


def test_serve_refuses_a_busy_port_and_a_missing_file(model_file, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "serve", str(model_file), "--port",
                              str(port)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: cannot listen on 127.0.0.1:"), res.stderr
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "serve", str(tmp_path / "none.gguf"),
                          "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr == f"error: {tmp_path / 'none.gguf'}: no such GGUF file\n"


def test_load_api_runs_the_pruning_knobs(model_file, local_answers):
    llm = load(model_file, top_k=1, n_ctx=512)
    llama.reset_slot_counter()
    got = reply(llm, [{"role": "user", "content": PROMPTS[3]}], max_tokens=MAX_TOKENS)
    selected, executed = llama.read_slot_counter()
    assert got == local_answers[PROMPTS[3]]
    assert selected > 0 and executed * 2 == selected
    unpruned = load(model_file, n_ctx=512)
    llama.reset_slot_counter()
    unpruned.create_completion("Hello", max_tokens=2)
    assert llama.read_slot_counter() == (0, 0)  # no rule: nothing masked, nothing counted
    with pytest.raises(McsharpError, match="different pruning rules"):
        load(model_file, top_k=1, prune_mu=0.5)
    with pytest.raises(McsharpError, match="contradict"):
        load(model_file, otp=False, otp_threshold=0.5)


def test_server_help_lists_the_pruning_knobs():
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0
    for flag in ("--otp", "--top-k", "--prune-mu", "--api-key", "--host", "--port"):
        assert flag in res.stdout


def test_pruning_knobs_reach_the_server_settings_typed():
    """The server parses KEY=TYPE:VALUE; an untyped or mistyped value would be dropped or misread."""
    assert _override_strings(prune_overrides("threshold=0.25")) == [
        "mcsharp.moe.prune_mode=int:1", "mcsharp.otp.threshold=float:0.25"]
    assert _override_strings(prune_overrides("off")) == ["mcsharp.otp.enable=bool:false"]
    assert _override_strings(prune_overrides(top_k=3)) == ["mcsharp.moe.prune_mode=int:2",
                                                           "mcsharp.moe.static_k=int:3"]


@pytest.mark.parametrize("body, status, code", [
    (b'{"model": "m", "messages": []}', None, None),
    (b'{"messages": [], "max_tokens": 5}', None, None),
    (b'{"model": "other", "messages": []}', 404, "model_not_found"),
    (b'{"messages": [], "max_tokens": 0}', 400, "invalid_value"),
    (b'{"messages": [], "max_tokens": 2.5}', 400, "invalid_value"),
    (b'{"messages": [], "max_tokens": true}', 400, "invalid_value"),
    (b'{"messages": [', 400, "invalid_json"),
    (b'"text"', 400, "invalid_json"),
    (b"\xff", 400, "invalid_json"),
])
def test_request_checks(body, status, code):
    got = check_request(body, {"m"})
    if status is None:
        assert got is None
    else:
        assert got[0] == status and json.loads(got[1])["error"]["code"] == code
