"""The native build cache: keyed by the patch set, incremental, and a no-op when nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


def test_second_setup_compiles_nothing():
    from mcsharp_gguf.runtime import ensure_runtime

    ensure_runtime()  # first build happens here if the cache is cold
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "setup", "--json"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["built_now"] is False
    assert info["patch_hash"] == nb.patch_hash()
    assert os.path.isfile(os.path.join(info["lib_dir"], "libllama.so"))
    assert len(info["llama_cpp_commit"]) == 40
    assert time.time() - t0 < 60


def test_tools_build_and_run(tiny_gguf, tmp_path):
    """`mcsharp setup --tools`: llama-quantize from the same patched build runs and its output loads."""
    from mcsharp_gguf import runtime

    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "setup", "--tools", "--json"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["tools"] == ["llama-quantize", "llama-imatrix", "llama-perplexity"]
    out = tmp_path / "q4_0.gguf"
    q = subprocess.run([os.path.join(info["lib_dir"], "bin", "llama-quantize"), str(tiny_gguf("qwen2moe", "f16")),
                        str(out), "Q4_0"], capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-2000:]
    assert runtime.logits_for(runtime.load_model(out, n_ctx=32), [1, 2, 3]).shape == (3, 49152)
