"""Fetch the pinned llama-cpp-python sdist, patch its vendored llama.cpp, build the shared libs.

Layout under the cache root (``$MCSHARP_CACHE`` or ``~/.cache/mcsharp-gguf``)::

    sdist/llama_cpp_python-<ver>.tar.gz     the pip-downloaded sdist (fetched once)
    src/llama_cpp_python-<ver>/             pristine extraction; Python imports gguf-py/conversion here
    work/<flavour>/src, work/<flavour>/build  patched copy + cmake tree, reused for incremental builds
    lib/<key>/                              finished libs (+ bin/ tools); key = hash(version, patches, flags)

A finished ``lib/<key>`` is never rebuilt. A new patch set only rewrites the source files whose
content actually changes, so cmake recompiles just those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
# MCSHARP_PATCH_DIR points at a patch set under development instead of the shipped one.
PATCH_DIR = Path(os.environ.get("MCSHARP_PATCH_DIR") or Path(__file__).resolve().parent / "patches")
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# Changing this string invalidates every cached build (bump when the cmake recipe changes).
RECIPE_VERSION = "1"


class NativeBuildError(RuntimeError):
    """A step of the native build failed; the message says which and how to fix it."""


def cache_root() -> Path:
    """Root of every cached artefact (sdist, sources, builds, fixtures)."""
    env = os.environ.get("MCSHARP_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcsharp-gguf"
    base.mkdir(parents=True, exist_ok=True)
    return base


def sdist_path() -> Path:
    """Download (once) the pinned llama-cpp-python sdist with pip and return its path."""
    dest = cache_root() / "sdist"
    tarball = dest / f"{SDIST_NAME}.tar.gz"
    if tarball.exists():
        return tarball
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / tarball.name
        if not got.exists():
            # --no-build-isolation needs scikit-build-core; retry with isolation before giving up.
            res = subprocess.run([c for c in cmd if c != "--no-build-isolation"], capture_output=True, text=True)
        if not got.exists():
            raise NativeBuildError(
                f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist "
                f"(pip said: {res.stderr.strip().splitlines()[-1:]}); check PyPI access or put the "
                f"tarball at {tarball}")
        os.replace(got, tarball)
    return tarball


def pristine_source() -> Path:
    """Extract the sdist once; return the unpatched ``vendor/llama.cpp`` directory."""
    root = cache_root() / "src" / SDIST_NAME
    llama_dir = root / "vendor" / "llama.cpp"
    if (root / ".complete").exists():
        return llama_dir
    tarball = sdist_path()
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="tar")
        (Path(tmp) / SDIST_NAME / ".complete").write_text("ok\n")
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            shutil.rmtree(root)
        os.replace(Path(tmp) / SDIST_NAME, root)
    return llama_dir


def llama_cpp_commit(llama_dir: Path | None = None) -> str:
    """The vendored llama.cpp commit (the sdist ships its git metadata)."""
    llama_dir = llama_dir or pristine_source()
    res = subprocess.run(["git", "-C", str(llama_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def patch_files() -> list[Path]:
    """The patches applied to llama.cpp, in name order."""
    return sorted(PATCH_DIR.glob("*.patch"))


@dataclass(frozen=True)
class BuildOptions:
    """What to build: which GPU backend (none/cuda/metal), tools and tests on top of the libs."""

    backend: str = "cpu"
    tools: bool = False
    tests: bool = False
    cuda_arch: str = "native"

    def cmake_args(self) -> list[str]:
        args = [
            "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DGGML_NATIVE=ON",
            f"-DLLAMA_BUILD_TOOLS={'ON' if self.tools else 'OFF'}",
            f"-DLLAMA_BUILD_TESTS={'ON' if self.tests else 'OFF'}",
            f"-DLLAMA_BUILD_COMMON={'ON' if (self.tools or self.tests) else 'OFF'}",
            # Once copied out of the build tree, libraries find each other next to themselves and the
            # tools (in bin/) find them one level up.
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/..",
        ]
        if self.backend == "cuda":
            args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_arch}"]
        elif self.backend == "metal":
            args += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
        return args

    def targets(self) -> list[str]:
        tg = ["llama"]
        if self.tools:
            tg += list(TOOLS)
        if self.tests:
            tg += ["test-backend-ops"]
        return tg


def patch_hash() -> str:
    """Hash of the ordered patch set (names and contents)."""
    h = hashlib.sha256()
    for p in patch_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_key(opts: BuildOptions) -> str:
    h = hashlib.sha256(json.dumps(
        [RECIPE_VERSION, LLAMA_CPP_PYTHON_VERSION, patch_hash(), opts.cmake_args()]).encode())
    return f"{opts.backend}-{h.hexdigest()[:16]}"


def _touched_files(patches: list[Path]) -> set[str]:
    files: set[str] = set()
    for p in patches:
        for line in p.read_text(errors="replace").splitlines():
            if line.startswith(("+++ b/", "--- a/")):
                files.add(line[6:].split("\t")[0].strip())
    return files


def _sync_patched_tree(pristine: Path, work_src: Path) -> None:
    """Make ``work_src`` equal pristine + patches, rewriting only files whose content changes."""
    if not (work_src / ".complete").exists():
        if work_src.exists():
            shutil.rmtree(work_src)
        shutil.copytree(pristine, work_src, symlinks=True)
        (work_src / ".complete").write_text("[]")
    previous = set(json.loads((work_src / ".complete").read_text()))
    patches = patch_files()
    touched = _touched_files(patches)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for rel in touched:
            if (pristine / rel).exists():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(pristine / rel, stage / rel)
        for p in patches:
            res = subprocess.run(["git", "apply", "--whitespace=nowarn", str(p)], cwd=stage,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise NativeBuildError(f"patch {p.name} does not apply to llama.cpp "
                                       f"{LLAMA_CPP_PYTHON_VERSION}: {res.stderr.strip()}; regenerate it")
        for rel in sorted(previous | touched):
            want = stage / rel if rel in touched else pristine / rel
            have = work_src / rel
            if want.exists():
                if not have.exists() or have.read_bytes() != want.read_bytes():
                    have.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(want, have)
            elif have.exists():
                have.unlink()
    (work_src / ".complete").write_text(json.dumps(sorted(touched)))


@dataclass
class BuildInfo:
    """Where a finished build lives and what it is."""

    lib_dir: str
    llama_cpp_commit: str
    patch_hash: str
    patches: list[str]
    backends: list[str]
    tools: list[str]
    key: str
    built_now: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def lib_dir_for(opts: BuildOptions) -> Path:
    return cache_root() / "lib" / build_key(opts)


def find_build(opts: BuildOptions | None = None) -> BuildInfo | None:
    """A finished build for these options (or any superset with tools/tests), without building."""
    opts = opts or BuildOptions()
    candidates = [opts]
    if not opts.tools:
        candidates.append(BuildOptions(opts.backend, True, opts.tests, opts.cuda_arch))
    for cand in candidates:
        info_file = lib_dir_for(cand) / "build-info.json"
        if info_file.exists():
            return BuildInfo(**json.loads(info_file.read_text()))
    return None


def build(opts: BuildOptions | None = None, jobs: int | None = None, log=print, work_name: str | None = None
          ) -> BuildInfo:
    """Build (or reuse) the patched runtime for ``opts`` and return where it lives.

    ``work_name`` names the source/build work tree (default: the backend), so another patch set can build
    without recompiling this one's tree.
    """
    opts = opts or BuildOptions()
    out = lib_dir_for(opts)
    existing = find_build(opts)  # the exact build, or one that also has the tools
    if existing is not None:
        return existing
    if shutil.which("cmake") is None:
        raise NativeBuildError("cmake not found; install it (pip install cmake, or apt install cmake)")
    pristine = pristine_source()
    work = cache_root() / "work" / (work_name or opts.backend)
    src, bld = work / "src", work / "build"
    log(f"[setup] syncing patched llama.cpp source in {src}")
    _sync_patched_tree(pristine, src)
    log("[setup] configuring with cmake")
    res = subprocess.run(["cmake", "-S", str(src), "-B", str(bld), *opts.cmake_args()],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise NativeBuildError(f"cmake configure failed in {bld}: {res.stderr.strip()[-2000:]}")
    jobs = jobs or os.cpu_count() or 2
    log(f"[setup] building {', '.join(opts.targets())} with {jobs} jobs (first build takes ~10 min)")
    with open(work / "build.log", "w") as fh:
        # one target at a time: several --target in one parallel make build their shared dependencies
        # concurrently and can race (seen: llama-quantize linked before its -impl library was complete)
        for target in opts.targets():
            res = subprocess.run(["cmake", "--build", str(bld), "--config", "Release", "-j", str(jobs),
                                  "--target", target], stdout=fh, stderr=subprocess.STDOUT)
            if res.returncode != 0:
                break
    if res.returncode != 0:
        tail = (work / "build.log").read_text(errors="replace")[-3000:]
        raise NativeBuildError(f"native build failed (log: {work / 'build.log'}):\n{tail}")
    tmp_out = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else _mk(out.parent)))
    for so in sorted((bld / "bin").glob("lib*.so*")) + sorted((bld / "bin").glob("lib*.dylib")):
        shutil.copy2(so, tmp_out / so.name, follow_symlinks=False)
    tools = []
    for name in opts.targets()[1:]:
        exe = bld / "bin" / name
        if exe.exists():
            (tmp_out / "bin").mkdir(exist_ok=True)
            shutil.copy2(exe, tmp_out / "bin" / name)
            tools.append(name)
    backends = ["cpu"] + ([opts.backend] if opts.backend != "cpu" else [])
    info = BuildInfo(lib_dir=str(out), llama_cpp_commit=llama_cpp_commit(pristine), patch_hash=patch_hash(),
                     patches=[p.name for p in patch_files()], backends=backends, tools=tools,
                     key=build_key(opts))
    (tmp_out / "build-info.json").write_text(json.dumps(info.to_json(), indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp_out, out)
    info.built_now = True
    return info


def build_stock(log=print) -> BuildInfo:
    """The same recipe with no patches: the unpatched llama.cpp that tests and benchmarks compare against.

    Built in its own work tree, so it never forces a recompile of the patched one.
    """
    global PATCH_DIR
    saved = PATCH_DIR
    with tempfile.TemporaryDirectory() as empty:
        PATCH_DIR = Path(empty)  # every key/hash helper reads the patch set from here
        try:
            return build(BuildOptions(), log=log, work_name="cpu-stock")
        finally:
            PATCH_DIR = saved


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def build_dir(opts: BuildOptions | None = None) -> Path:
    """The cmake build tree used for ``opts`` (test binaries live in its ``bin``)."""
    return cache_root() / "work" / (opts or BuildOptions()).backend / "build"


if __name__ == "__main__":
    # Stdlib-only entry for bootstrap scripts: `python native/build.py sdist` prints the sdist path
    # (downloading it once) so the bindings can be installed from the same pinned source.
    if sys.argv[1:] == ["sdist"]:
        print(sdist_path())
    else:
        print(json.dumps(build().to_json(), indent=2))
