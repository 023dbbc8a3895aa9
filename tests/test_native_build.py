"""The native build cache: keyed by the patch set, incremental, and a no-op when nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcsharp_gguf.native import build as nb

PATCH = """--- a/src/b.c
+++ b/src/b.c
@@ -1 +1 @@
-int b = 1;
+int b = 2;
"""


def _tree(root):
    (root / "src").mkdir(parents=True)
    for name, body in {"a.c": "int a = 1;\n", "b.c": "int b = 1;\n", "c.c": "int c = 1;\n"}.items():
        (root / "src" / name).write_text(body)


def test_patched_tree_rewrites_only_changed_files(tmp_path, monkeypatch):
    pristine, work, patches = tmp_path / "pristine", tmp_path / "work", tmp_path / "patches"
    _tree(pristine)
    patches.mkdir()
    monkeypatch.setattr(nb, "PATCH_DIR", patches)

    nb._sync_patched_tree(pristine, work)  # no patches: a plain copy
    assert (work / "src" / "b.c").read_text() == "int b = 1;\n"
    old = {p.name: p.stat().st_mtime_ns for p in (work / "src").iterdir()}
    h0 = nb.patch_hash()

    time.sleep(0.01)
    (patches / "0001-b.patch").write_text(PATCH)
    nb._sync_patched_tree(pristine, work)
    assert (work / "src" / "b.c").read_text() == "int b = 2;\n"
    new = {p.name: p.stat().st_mtime_ns for p in (work / "src").iterdir()}
    assert new["a.c"] == old["a.c"] and new["c.c"] == old["c.c"]  # untouched → cmake won't recompile
    assert new["b.c"] != old["b.c"]
    assert nb.patch_hash() != h0

    (patches / "0001-b.patch").unlink()  # dropping the patch restores pristine content
    nb._sync_patched_tree(pristine, work)
    assert (work / "src" / "b.c").read_text() == "int b = 1;\n"
    assert nb.patch_hash() == h0


def test_bad_patch_is_a_clear_error(tmp_path, monkeypatch):
    pristine, work, patches = tmp_path / "pristine", tmp_path / "work", tmp_path / "patches"
    _tree(pristine)
    patches.mkdir()
    (patches / "0001-bad.patch").write_text(PATCH.replace("int b = 1;", "int b = 7;"))
    monkeypatch.setattr(nb, "PATCH_DIR", patches)
    try:
        nb._sync_patched_tree(pristine, work)
    except nb.NativeBuildError as e:
        assert "0001-bad.patch" in str(e) and "does not apply" in str(e)
    else:
        raise AssertionError("a patch that does not apply must fail")


def test_finished_build_is_reused_without_compiling(tmp_path, monkeypatch):
    """build() returns a finished lib/<key> as it is (built_now False) without running anything (no download,
    cmake or compiler); a new patch set is a new key, which that build does not satisfy."""
    monkeypatch.setenv("MCSHARP_CACHE", str(tmp_path / "cache"))
    patches = tmp_path / "patches"
    patches.mkdir()
    monkeypatch.setattr(nb, "PATCH_DIR", patches)
    opts = nb.BuildOptions()
    out = nb.lib_dir_for(opts)
    out.mkdir(parents=True)
    done = nb.BuildInfo(lib_dir=str(out), llama_cpp_commit="0" * 40, patch_hash=nb.patch_hash(), patches=[],
                        backends=["cpu"], tools=[], key=nb.build_key(opts))
    (out / "build-info.json").write_text(json.dumps(done.to_json()))

    def no_work(*args, **kw):
        raise AssertionError(f"build() did work on a finished build: {args}")

    monkeypatch.setattr(nb.subprocess, "run", no_work)  # pip download, git, cmake
    got = nb.build(opts, log=no_work)  # every step logs before it starts
    assert got == done and got.built_now is False
    (patches / "0001-b.patch").write_text(PATCH)
    assert nb.build_key(opts) != done.key and nb.find_build(opts) is None


@pytest.mark.slow  # builds the patched runtime if the cache is cold (~10 min)
def test_second_setup_compiles_nothing(tmp_path):
    """Once built, `mcsharp setup` finds the build by its key: it succeeds with no cmake or compiler on PATH
    (a rebuild would fail with "cmake not found") and rewrites nothing in the finished build or its work tree."""
    from mcsharp_gguf.runtime.llama import ensure_runtime

    built = ensure_runtime()  # first build happens here if the cache is cold
    lib_dir = Path(built.lib_dir)  # the plain build, or one that also has the tools
    assert lib_dir.name == built.key
    assert built.key in {nb.build_key(nb.BuildOptions()), nb.build_key(nb.BuildOptions(tools=True))}

    def snapshot():
        files = [p for p in lib_dir.rglob("*") if p.is_file()]
        build_log = nb.cache_root() / "work" / "cpu" / "build.log"
        return {str(p): p.stat().st_mtime_ns for p in files + ([build_log] if build_log.exists() else [])}

    before = snapshot()
    no_tools = tmp_path / "empty-path"
    no_tools.mkdir()
    env = {**os.environ, "PATH": str(no_tools)}  # sys.executable is absolute; cmake, cc and git are gone
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "setup", "--json"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["built_now"] is False
    assert info["lib_dir"] == str(lib_dir) and info["key"] == built.key
    assert info["patch_hash"] == nb.patch_hash()
    assert os.path.isfile(os.path.join(info["lib_dir"], "libllama.so"))
    assert len(info["llama_cpp_commit"]) == 40
    assert snapshot() == before  # no library copied, no build log written


@pytest.mark.slow  # builds the tools into the patched runtime, converts a tiny model
def test_tools_build_and_run(tiny_gguf, tmp_path):
    """`mcsharp setup --tools`: llama-quantize from the same patched build runs and its output loads."""
    from mcsharp_gguf.runtime import llama

    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "setup", "--tools", "--json"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["tools"] == ["llama-quantize", "llama-imatrix", "llama-perplexity"]
    out = tmp_path / "q4_0.gguf"
    q = subprocess.run([os.path.join(info["lib_dir"], "bin", "llama-quantize"), str(tiny_gguf("qwen2moe", "f16")),
                        str(out), "Q4_0"], capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-2000:]
    assert llama.logits_for(llama.load_model(out, n_ctx=32), [1, 2, 3]).shape == (3, 49152)
