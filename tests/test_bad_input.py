"""Generated bad input (hypothesis): mutated GGUF headers and tensor tables against `inspect` and `otp strip`,
mutated checkpoints against `convert`. Every case must end as a user can act on: exit 0 or a one-line `error:`
with exit 2 — never a traceback, an internal error (exit 3), a changed input file or a partial output."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASES = settings(max_examples=80, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_main_io(args: list[str], capsys) -> tuple[int, str, str]:
    """`mcsharp ARGS` in this process, as the console entry point runs it: (exit status, stdout, stderr)."""
    from mcsharp_gguf.cli import main

    old = sys.argv
    sys.argv = ["mcsharp", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """run_main_io without the stdout: (exit status, stderr)."""
    code, _, err = run_main_io(args, capsys)
    return code, err


def assert_user_outcome(code: int, err: str, what: str) -> None:
    """Exit 0, or exit 2 with exactly one `error:` line; never a traceback or an internal error."""
    assert "Traceback" not in err and "error: internal" not in err, (what, err)
    assert code in (0, 2), (what, code, err)
    if code == 2:
        assert len([ln for ln in err.splitlines() if ln.startswith("error: ")]) == 1, (what, err)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_layout(path: Path) -> dict:
    """Offsets in a GGUF's header: the counts, and where the tensor table and data section start."""
    import gguf

    r = gguf.GGUFReader(path)
    first = min(r.tensors, key=lambda t: t.data_offset)
    info_start = min(t.field.offset for t in r.tensors)
    return {"n_tensors": 8, "n_kv": 16, "info_start": info_start, "data_start": r.data_offset,
            "first_data": first.data_offset, "size": path.stat().st_size}


@pytest.fixture(scope="module")
def gguf_with_routers(tiny_model, tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE F32 GGUF with OTP routers (what `otp strip` edits), without the tokenizer's 49k-entry
    arrays (gguf-py takes seconds to parse them; the header fuzz needs the tensor table, not the vocabulary)."""
    from mcsharp_gguf.gguf.edit import rewrite_gguf
    from mcsharp_gguf.pipeline import run
    from mcsharp_gguf.recipe import Recipe

    d = tmp_path_factory.mktemp("fuzz")
    run(Recipe(preset="F32", otp=True, calib_seqs=2, calib_len=32), tiny_model("qwen3moe"), d / "full.gguf",
        device="cpu", log=lambda s: None)
    return rewrite_gguf(d / "full.gguf", d / "tiny-otp.gguf", drop_key=lambda k: k.startswith("tokenizer.ggml."))


def _mutations(layout: dict) -> st.SearchStrategy:
    """(offset, bytes to write) or ("truncate", length): a count changed, a header or table byte changed, the
    file cut short."""
    u64 = st.integers(min_value=0, max_value=2 ** 64 - 1)
    near = st.integers(min_value=-3, max_value=3)
    return st.one_of(
        st.tuples(st.sampled_from(["n_tensors", "n_kv"]), near).map(lambda x: ("delta", *x)),
        st.tuples(st.sampled_from(["n_tensors", "n_kv"]), u64).map(lambda x: ("set", *x)),
        st.tuples(st.integers(min_value=24, max_value=layout["data_start"] - 1),
                  st.integers(min_value=0, max_value=255)).map(lambda x: ("byte", *x)),
        st.tuples(st.integers(min_value=layout["info_start"], max_value=layout["data_start"] - 1),
                  st.binary(min_size=1, max_size=8)).map(lambda x: ("table", *x)),
        st.integers(min_value=0, max_value=layout["size"] - 1).map(lambda n: ("truncate", n)),
    )


def _apply(src: Path, dst: Path, layout: dict, m: tuple) -> None:
    data = bytearray(src.read_bytes())
    kind = m[0]
    if kind in ("delta", "set"):
        off = layout[m[1]]
        old = struct.unpack_from("<Q", data, off)[0]
        struct.pack_into("<Q", data, off, (old + m[2]) % 2 ** 64 if kind == "delta" else m[2])
    elif kind == "byte":
        data[m[1]] = m[2]
    elif kind == "table":
        data[m[1]:m[1] + len(m[2])] = m[2]
    else:
        del data[m[1]:]
    dst.write_bytes(bytes(data))


@CASES
@given(data=st.data())
def test_fuzz_gguf_header_against_inspect_and_strip(gguf_with_routers, tmp_path, capsys, data):
    """A mutated header or tensor table (counts off by a little or a lot, any byte of the header, table
    entries overwritten, the file cut short): `inspect` and `otp strip` either succeed or say what is wrong in
    one line; the input is never changed and a failed strip leaves no output."""
    layout = header_layout(gguf_with_routers)
    m = data.draw(_mutations(layout))
    case = Path(tempfile.mkdtemp(dir=tmp_path))  # (tmp_path is shared by the examples)
    bad = case / "bad.gguf"
    _apply(gguf_with_routers, bad, layout, m)
    before = digest(bad)
    code, err = run_main(["inspect", str(bad), "--json"], capsys)
    assert_user_outcome(code, err, ("inspect", m))
    out = bad.with_name(bad.stem + "-stripped.gguf")
    code, err = run_main(["otp", "strip", str(bad), "-o", str(out)], capsys)
    assert_user_outcome(code, err, ("strip", m))
    assert digest(bad) == before
    leftovers = [p for p in case.iterdir() if p not in (bad, out)]
    assert not leftovers, leftovers
    if code == 0:  # what it wrote is a whole, consistent GGUF
        code, err = run_main(["inspect", str(out)], capsys)
        assert code == 0, (m, err)
    else:
        assert not out.exists(), m


def _config_mutations() -> st.SearchStrategy:
    """A config.json field set to a wrong, missing or absurd value."""
    keys = ["hidden_size", "num_experts", "num_experts_per_tok", "num_hidden_layers", "moe_intermediate_size",
            "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "architectures", "model_type", "rms_norm_eps", "torch_dtype"]
    values = st.one_of(st.none(), st.integers(min_value=-4, max_value=100_000), st.just("x"), st.just([]),
                       st.just(["NoSuchForCausalLM"]), st.floats(allow_nan=True, allow_infinity=True))
    return st.tuples(st.sampled_from(keys), st.one_of(values, st.just("<delete>")))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(m=_config_mutations())
def test_fuzz_checkpoint_config_against_convert(tiny_model, tmp_path, capsys, m):
    """A checkpoint whose config.json has one field wrong, missing or absurd: `convert --preset F32` (checks
    and the plain conversion) succeeds or names the problem in one line; the checkpoint is untouched and a
    failure leaves no output."""
    import shutil

    src = tiny_model("qwen3moe")
    case = Path(tempfile.mkdtemp(dir=tmp_path))  # (tmp_path is shared by the examples)
    ckpt = case / "ckpt"
    shutil.copytree(src, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    key, value = m
    if value == "<delete>":
        cfg.pop(key, None)
    else:
        cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    before = {p.name: digest(p) for p in ckpt.iterdir() if p.is_file()}
    out = case / "o.gguf"
    code, err = run_main(["convert", str(ckpt), "-o", str(out), "--preset", "F32"], capsys)
    assert_user_outcome(code, err, m)
    assert {p.name: digest(p) for p in ckpt.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in case.iterdir()) == (["ckpt", "o.gguf"] if code == 0 else ["ckpt"]), m
    shutil.rmtree(case)


def _shard_mutations(size: int, header_end: int) -> st.SearchStrategy:
    """A safetensors shard cut short, or a byte of its length prefix or JSON header changed."""
    return st.one_of(
        st.integers(min_value=0, max_value=size - 1).map(lambda n: ("truncate", n)),
        st.tuples(st.integers(min_value=0, max_value=header_end - 1),
                  st.integers(min_value=0, max_value=255)).map(lambda x: ("byte", *x)),
    )


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_checkpoint_shard_against_convert(tiny_model, tmp_path, capsys, data):
    """A weights shard cut short or with its header damaged: `convert --preset F32` succeeds (a change that
    leaves a valid header) or names the shard in one line; nothing else in the checkpoint changes and a failure
    leaves no output."""
    import shutil

    src = tiny_model("qwen3moe")
    shard = sorted(src.glob("*.safetensors"))[0]
    size = shard.stat().st_size
    header_end = 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]
    m = data.draw(_shard_mutations(size, header_end))
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    ckpt = case / "ckpt"
    shutil.copytree(src, ckpt)
    target = ckpt / shard.name
    raw = bytearray(target.read_bytes())
    if m[0] == "truncate":
        del raw[m[1]:]
    else:
        raw[m[1]] = m[2]
    target.write_bytes(bytes(raw))
    before = {p.name: digest(p) for p in ckpt.iterdir() if p.is_file()}
    out = case / "o.gguf"
    code, err = run_main(["convert", str(ckpt), "-o", str(out), "--preset", "F32"], capsys)
    assert_user_outcome(code, err, m)
    if code == 2 and m[0] == "truncate":
        assert shard.name in err, (m, err)
    assert {p.name: digest(p) for p in ckpt.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in case.iterdir()) == (["ckpt", "o.gguf"] if code == 0 else ["ckpt"]), m
    shutil.rmtree(case)


@pytest.mark.slow  # (tiny_model: the SmolLM2 tokenizer, pinned converter; four conversions)
def test_kill_9_at_random_points_then_resume_gives_the_same_bytes(tiny_model, tmp_path):
    """`mcsharp convert` (importance, plan, GPTQ, OTP) killed with SIGKILL at random moments, then run again
    with the same command: the rerun resumes from the work dir and writes the bytes of an uninterrupted run;
    nothing of the killed run is left beside the output."""
    import random
    import signal
    import subprocess
    import time

    model = tiny_model("qwen3moe", hidden=128, n_expert=32, top_k=4, expert_ff=128)

    def convert(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "mcsharp_gguf.cli", "convert", str(model), "-o", str(out),
                                 "--bpw", "3.5", "--otp", "--calib-seqs", "4", "--calib-len", "64", "--device",
                                 "cpu", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    t0 = time.monotonic()
    whole = convert(tmp_path / "whole.gguf")
    assert whole.wait(timeout=900) == 0, whole.stderr.read()[-2000:]
    wall = time.monotonic() - t0
    rng = random.Random(0)
    for k in range(3):
        case = tmp_path / f"kill{k}"
        case.mkdir()
        out = case / "m.gguf"
        p = convert(out)
        time.sleep(rng.uniform(0.1, 0.7) * wall)
        p.send_signal(signal.SIGKILL)
        p.wait()
        rerun = []
        if out.exists():  # killed after the output appeared (runs vary in speed): it is complete, by the rename
            assert digest(out) == digest(tmp_path / "whole.gguf"), k
            rerun = ["--force"]  # the same command would now refuse to replace it; resume what is left
        again = convert(out, *rerun)
        assert again.wait(timeout=900) == 0, again.stderr.read()[-2000:]
        assert digest(out) == digest(tmp_path / "whole.gguf"), k
        assert sorted(p.name for p in case.iterdir()) == ["m.gguf"], list(case.iterdir())


@pytest.fixture()
def small_disk(tmp_path):
    """Factory: size in bytes → the path of a freshly mounted tmpfs of that size (a real full disk: the kernel's
    ENOSPC, not a mock). Mounting needs root: elsewhere the full-disk cases skip, saying so."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("the full-disk cases mount a small tmpfs, which needs root (CI runs as root)")
    mounted = []

    def mount(size: int) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _grow(mnt: Path, size: int) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)  # keeps what it holds


_SMALL_CONVERT = ["--bpw", "4", "--calib-seqs", "2", "--calib-len", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference_gguf(tiny_model, tmp_path_factory) -> Path:
    """The tiny model converted once without any disk trouble: what every resumed run must reproduce."""
    from mcsharp_gguf.cli import cli

    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    cli.main(["convert", str(tiny_model("qwen2moe")), "-o", str(out), *_SMALL_CONVERT], standalone_mode=False)
    return out


def test_full_disk_is_refused_before_any_work(tiny_model, small_disk, capsys):
    """An output disk too small for the file: the free-space check says so in one line before calibration."""
    disk = small_disk(1 << 20)
    code, err = run_main(["convert", str(tiny_model("qwen2moe")), "-o", str(disk / "m.gguf"), "--preset", "F32"],
                         capsys)
    assert_user_outcome(code, err, "small disk")
    assert code == 2 and "not enough free disk" in err and str(disk) in err, err
    assert list(disk.iterdir()) == []


def test_disk_full_while_writing_the_gguf(tiny_model, small_disk, reference_gguf, tmp_path, capsys, monkeypatch):
    """The disk fills after the free-space check (another writer): the GGUF write fails with one line naming the
    output; neither it nor its temp or spill file is left on the full disk, the work dir with every finished
    layer is kept and named, and the same command with room resumes to the bytes of an untroubled run."""
    from mcsharp_gguf import pipeline

    monkeypatch.setattr(pipeline, "check_disk", lambda *a, **k: None)  # (passed; the disk filled afterwards)
    disk = small_disk(1 << 20)  # the GGUF is ~5 MB
    work = tmp_path / "work"
    args = ["convert", str(tiny_model("qwen2moe")), "-o", str(disk / "m.gguf"), "--work-dir", str(work),
            *_SMALL_CONVERT]
    code, err = run_main(args, capsys)
    assert_user_outcome(code, err, "output disk full")
    assert code == 2 and "no space left" in err and str(disk / "m.gguf") in err and str(work) in err, err
    assert list(disk.iterdir()) == []
    layers = sorted(p.name for p in work.glob("layer-*.pt"))
    assert len(layers) == 2, layers
    _grow(disk, 64 << 20)
    code, err = run_main(args, capsys)
    assert code == 0, err
    assert digest(disk / "m.gguf") == digest(reference_gguf)
    assert sorted(p.name for p in disk.iterdir()) == ["m.gguf"]


def test_disk_full_in_the_work_dir_then_resume(tiny_model, small_disk, reference_gguf, tmp_path, capsys,
                                                monkeypatch):
    """The work dir's disk fills while GPTQ saves a layer (torch reports it as a RuntimeError without errno):
    one line naming the file and the work dir, no `.tmp` left in it, no output; after room is made, the same
    command resumes from the layers that were finished and writes the bytes of an untroubled run."""
    from mcsharp_gguf import pipeline

    monkeypatch.setattr(pipeline, "check_disk", lambda *a, **k: None)
    disk = small_disk(1 << 20)  # the importance state and both layers fit; the LM head's 2.7 MB entry does not
    work = disk / "work"
    out = tmp_path / "m.gguf"
    args = ["convert", str(tiny_model("qwen2moe")), "-o", str(out), "--work-dir", str(work), *_SMALL_CONVERT]
    code, err = run_main(args, capsys)
    assert_user_outcome(code, err, "work disk full")
    assert code == 2 and "no space left" in err and f"kept in {work}" in err, err
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))
    left = sorted(p.name for p in work.rglob("*") if p.is_file())
    assert not [n for n in left if n.endswith(".tmp")], left
    assert "layer-0000.pt" in left, left
    _grow(disk, 64 << 20)
    code, err = run_main(args, capsys)
    assert code == 0, err
    assert digest(out) == digest(reference_gguf)


@pytest.fixture(scope="module")
def gguf_to_run(tiny_model, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny Qwen3-MoE F32 GGUF with OTP routers and its tokenizer (what eval and chat load), a router file
    for `otp add`, and where its counts, numeric metadata values and tensor-table entries lie."""
    import gguf

    from mcsharp_gguf.dev.gguf_layout import numeric_value_offsets, table_entries
    from mcsharp_gguf.pipeline import run
    from mcsharp_gguf.recipe import Recipe

    d = tmp_path_factory.mktemp("fuzz-run")
    res = run(Recipe(preset="F32", otp=True, calib_seqs=2, calib_len=32), tiny_model("qwen3moe"), d / "m.gguf",
              device="cpu", log=lambda s: None)
    res.routers.save(d / "routers.npz")
    r = gguf.GGUFReader(d / "m.gguf")
    numeric = numeric_value_offsets(r)  # key → (offset of its value, struct format)
    entries = table_entries(r)
    layout = {"n_tensors": 8, "n_kv": 16, "size": (d / "m.gguf").stat().st_size, "numeric": numeric,
              "entries": entries}
    return d / "m.gguf", d / "routers.npz", layout


def _run_mutations(layout: dict) -> st.SearchStrategy:
    """A numeric metadata value (hyperparameters, token ids, OTP settings) set to an edge value; a tensor-table
    field (dimension count, a dimension, the type, the data offset) changed; a count off; the file cut short."""
    edge_int = st.sampled_from([0, 1, 2, 3, 7, 8, 9, 64, 255, 65535, 2 ** 31 - 1, 2 ** 32 - 1])
    edge_float = st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")])
    big = st.sampled_from([0, 1, 2, 63, 65, 128, 2 ** 31, 2 ** 63])
    return st.one_of(
        st.tuples(st.sampled_from(sorted(layout["numeric"])), edge_int, edge_float).map(lambda x: ("kv", *x)),
        st.tuples(st.integers(0, len(layout["entries"]) - 1), st.sampled_from(["n_dims", "ne0", "type", "offset"]),
                  big).map(lambda x: ("entry", *x)),
        st.tuples(st.sampled_from(["n_tensors", "n_kv"]), st.integers(-2, 2)).map(lambda x: ("delta", *x)),
        st.integers(0, layout["size"] - 1).map(lambda n: ("truncate", n)),
    )


def _apply_run_mutation(src: Path, dst: Path, layout: dict, m: tuple) -> None:
    data = bytearray(src.read_bytes())
    if m[0] == "kv":
        off, fmt = layout["numeric"][m[1]]
        value = m[3] if fmt == "<f" else m[2] % 256 if fmt == "<B" else m[2] % 2 ** 31 if fmt == "<i" else m[2]
        struct.pack_into(fmt, data, off, value)
    elif m[0] == "entry":
        off, fmt = layout["entries"][m[1]].field_offset(m[2])
        value = m[3] * 32 % 2 ** 64 if m[2] == "offset" else m[3] % 2 ** 32 if fmt == "<I" else m[3]
        struct.pack_into(fmt, data, off, value)
    elif m[0] == "delta":
        off = layout[m[1]]
        struct.pack_into("<Q", data, off, (struct.unpack_from("<Q", data, off)[0] + m[2]) % 2 ** 64)
    else:
        del data[m[1]:]
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("key,value", [
    ("qwen3moe.block_count", 0), ("qwen3moe.block_count", 65535), ("qwen3moe.expert_count", 1),
    ("qwen3moe.expert_count", 4096), ("qwen3moe.expert_used_count", 0), ("qwen3moe.expert_used_count", 9),
    ("qwen3moe.attention.layer_norm_rms_epsilon", -1.0), ("qwen3moe.attention.layer_norm_rms_epsilon", float("nan")),
    ("qwen3moe.context_length", 2 ** 32 - 1)])
def test_hyperparameters_llama_cpp_aborts_on_are_refused_before_loading(gguf_to_run, tmp_path, capsys, key, value):
    """Values found by fuzzing that made llama.cpp abort the process (SIGABRT: GGML_ASSERT in load_hparams or a
    norm op) or crash llama-cpp-python's tokenizer: `eval` now refuses them in one line naming the key (this
    test runs in-process: without the check it would abort pytest)."""
    src, _, layout = gguf_to_run
    bad = tmp_path / "bad.gguf"
    _apply_run_mutation(src, bad, layout, ("kv", key, value if isinstance(value, int) else 0, value))
    code, err = run_main(["eval", str(bad), "--max-tokens", "40", "--ctx", "16"], capsys)
    assert code == 2 and err.startswith("error: ") and "convert it again" in err, err
    assert key.split(".", 1)[1] in err, err  # (expert_count 1 < 2 used: named through expert_used_count's range)
    # `otp add` refuses it too: routers added to it would give a file that still cannot load
    src_routers, out = gguf_to_run[1], tmp_path / "with-routers.gguf"
    code, err = run_main(["otp", "add", str(bad), str(src_routers), "-o", str(out)], capsys)
    assert code == 2 and key.split(".", 1)[1] in err and not out.exists(), err


@pytest.mark.parametrize("ggml_type", [1, 2])
def test_a_norm_stored_as_another_type_is_refused_before_loading(gguf_to_run, tmp_path, capsys, ggml_type):
    """The output norm's table entry saying F16 / Q4_1 instead of F32 (found by fuzzing: llama.cpp aborted the
    process in the norm op): one line naming the tensor, before the loader."""
    src, _, layout = gguf_to_run
    i = next(i for i, e in enumerate(layout["entries"]) if e.name == "output_norm.weight")
    bad = tmp_path / "bad.gguf"
    _apply_run_mutation(src, bad, layout, ("entry", i, "type", ggml_type))
    code, err = run_main(["chat", str(bad), "--prompt", "hi", "--max-tokens", "3"], capsys)
    assert code == 2 and "output_norm.weight" in err and "F32" in err, err


@pytest.mark.slow  # (~3 min: otp add reads the tokenizer's 49k-entry arrays with gguf-py in every example)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_gguf_against_eval_chat_and_otp_add(gguf_to_run, tmp_path, capsys, data):
    """A GGUF with a damaged hyperparameter, tensor-table entry, count or length, loaded by llama.cpp (`eval
    --json`, `chat`) and edited by `otp add`: each command succeeds (eval's JSON stays JSON) or says what is wrong
    in one line; the input never changes and a failed `otp add` leaves nothing behind."""
    src, routers, layout = gguf_to_run
    m = data.draw(_run_mutations(layout))
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    bad = case / "bad.gguf"
    _apply_run_mutation(src, bad, layout, m)
    before = digest(bad)
    code, out_text, err = run_main_io(["eval", str(bad), "--max-tokens", "40", "--ctx", "16", "--json"], capsys)
    assert_user_outcome(code, err, ("eval", m))
    if code == 0:
        json.loads(out_text)
    code, err = run_main(["chat", str(bad), "--prompt", "hi", "--max-tokens", "3"], capsys)
    assert_user_outcome(code, err, ("chat", m))
    out = case / "with-routers.gguf"
    code, err = run_main(["otp", "add", str(bad), str(routers), "-o", str(out)], capsys)
    assert_user_outcome(code, err, ("otp add", m))
    assert digest(bad) == before
    assert sorted(p.name for p in case.iterdir()) == sorted(["bad.gguf"] + (["with-routers.gguf"] if code == 0
                                                                            else [])), m
