#!/usr/bin/env python
"""Sweep a GGUF's header through edge values and load each variant in a forked child (not a test): finds what
makes llama.cpp abort or crash the process instead of failing with an error.

Every numeric metadata value (hyperparameters, token ids, OTP settings) is set in turn to each of a list of edge
values (0, 1, small, 2^31 − 1, 2^32 − 1, …; for floats 0, −1, tiny, huge, NaN, Inf), and every tensor-table
entry's dimension count, first two dimensions, ggml type and data offset likewise. Each variant runs one
command (default: `mcsharp eval FILE --max-tokens 40 --ctx 16`) in a child forked from a process that already
loaded the runtime, so a case costs a model load, not an interpreter start. A child that dies of a signal
(SIGABRT from a GGML_ASSERT, SIGSEGV, SIGFPE) or exits with anything but 0 / 2 is printed; the summary counts
cases and outcomes. tests/test_bad_input.py holds each kind it found, with a check that now refuses it first.

Usage: python scripts/fuzz_gguf_load.py FILE.gguf [--command eval|chat] [--only kv|table]
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path

INTS = [0, 1, 2, 3, 7, 8, 9, 64, 255, 65535, 2 ** 31 - 1, 2 ** 32 - 1]
FLOATS = [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")]
TABLE = [0, 1, 2, 63, 65, 128, 2 ** 31, 2 ** 63]


def kv_variants(reader):
    """(description, offset, struct format, value) for every numeric metadata value × edge value."""
    from mcsharp_gguf.dev.gguf_layout import numeric_value_offsets

    for name, (off, code) in numeric_value_offsets(reader).items():
        values = (FLOATS if code == "<f" else [0, 1, 2, 255] if code == "<B"
                  else [v % 2 ** 31 for v in INTS] if code == "<i" else INTS)
        for v in values:
            yield f"{name}={v}", off, code, v


def table_variants(reader):
    """(description, offset, struct format, value) for every tensor-table field × edge value."""
    from mcsharp_gguf.dev.gguf_layout import table_entries

    for e in table_entries(reader):
        for field in ("n_dims", "ne0", "type", "offset") + (("ne1",) if e.n_dims > 1 else ()):
            off, code = e.field_offset(field)
            for v in TABLE:
                value = v % 2 ** 32 if code == "<I" else v * 32 % 2 ** 64 if field == "offset" else v
                yield f"{e.name}.{field}={value}", off, code, value


def run_child(path: Path, command: str) -> int:
    """Fork; the child runs the command on ``path`` with its output discarded. Returns the wait status."""
    from mcsharp_gguf.cli import main

    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        sys.argv = ["mcsharp", command, str(path)] + (["--max-tokens", "40", "--ctx", "16"] if command == "eval"
                                                      else ["--prompt", "hi", "--max-tokens", "3"])
        try:
            main()
        except SystemExit as e:
            os._exit(int(e.code or 0))
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--command", choices=["eval", "chat"], default="eval")
    ap.add_argument("--only", choices=["kv", "table"], default=None)
    args = ap.parse_args()

    from mcsharp_gguf.llama_src import import_gguf
    from mcsharp_gguf.runtime.llama import llama_cpp_module

    gguf = import_gguf()
    llama_cpp_module(log=lambda s: None)  # loaded once, before the forks
    reader = gguf.GGUFReader(args.gguf)
    variants = ([] if args.only == "table" else list(kv_variants(reader))) + \
               ([] if args.only == "kv" else list(table_variants(reader)))
    original = args.gguf.read_bytes()
    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.gguf"
        for what, off, code, value in variants:
            data = bytearray(original)
            struct.pack_into(code, data, off, value)
            case.write_bytes(bytes(data))
            status = run_child(case, args.command)
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                outcomes[sig] += 1
                print(f"{sig:8s} {what}", flush=True)
            else:
                rc = os.WEXITSTATUS(status)
                outcomes[f"exit {rc}"] += 1
                if rc not in (0, 2):
                    print(f"exit {rc:<3d} {what}", flush=True)
    print(f"{len(variants)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))


if __name__ == "__main__":
    main()
