"""Locate or build llama.cpp (vendored in the llama-cpp-python sdist) and run it: GGUF conversion, logits, llama-bench.

The tests (``tests/test_gguf.py``, ``tests/test_llamacpp_parity.py``) and ``benchmarks/bench_llamacpp.py`` import
this file (``sys.path`` insert of ``benchmarks/``). Everything lives under one cache folder,
``$QWEN2MS_CACHE/llama.cpp/<sdist version>/`` (default ``~/.cache/qwen2ms``):

* ``src/``: the extracted sdist: the ``llama_cpp`` Python bindings and ``vendor/llama.cpp`` (whose
  ``convert_hf_to_gguf.py`` writes GGUFs from a transformers checkpoint). No compiler needed.
* ``build-<cpu key>/bin/``: ``libllama.so``, ``libggml*.so``, ``llama-bench``, ``llama-quantize``, built once with
  ``GGML_NATIVE=ON`` (so keyed by the CPU's flags), ``nice -n 19``, two jobs; ``BUILD_INFO.json`` records the
  flags and how long the build took.

Both are made in a temp folder and renamed into place, so a killed extraction or build never leaves a
half cache. ``$QWEN2MS_LLAMACPP_DIR`` names a prebuilt build instead (a folder holding ``bin/`` with the
libraries and tools, or those files directly); ``$QWEN2MS_LLAMACPP_SDIST`` a local sdist.

Usage:
    python benchmarks/llamacpp.py build          # build (or find) llama.cpp, print where and how long it took
    python benchmarks/llamacpp.py logits MODEL.gguf 1,2,3 OUT.npy 1 2   # logits per position (f32 KV cache, 2 threads)
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}"
ENV_DIR = "QWEN2MS_LLAMACPP_DIR"
ENV_SDIST = "QWEN2MS_LLAMACPP_SDIST"
TARGETS = ("llama", "llama-bench", "llama-quantize")


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp cannot be obtained here (no sdist, no compiler or cmake); the message says why (tests skip)."""


class LlamaCppBuildError(RuntimeError):
    """The toolchain is there but configuring or compiling llama.cpp failed (tests fail with the log tail)."""


def cache_root() -> Path:
    base = Path(os.environ.get("QWEN2MS_CACHE") or Path.home() / ".cache" / "qwen2ms")
    return base / "llama.cpp" / SDIST_VERSION


def cpu_description() -> Dict[str, str]:
    """The CPU model name and the SIMD flags that matter for the kernels (avx2, avx512*, vnni, bf16)."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    keep = sorted(f for f in flags if f in ("avx2", "fma", "f16c") or f.startswith("avx512") or "vnni" in f
                  or "bf16" in f or f.startswith("amx"))
    return {"model": model, "flags": " ".join(keep)}


def _cpu_key() -> str:
    # GGML_NATIVE compiles for this CPU's instruction set: a build is only reusable on the same flags.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# The source: the llama-cpp-python sdist, extracted once
# ---------------------------------------------------------------------------------------------
def sdist_path() -> Path:
    """The llama-cpp-python sdist: ``$QWEN2MS_LLAMACPP_SDIST``, the qwen2ms cache, else ``pip download`` from PyPI.

    Raises:
        LlamaCppUnavailable: none found and the download failed.
    """
    env = os.environ.get(ENV_SDIST)
    if env:
        if not Path(env).is_file():
            raise LlamaCppUnavailable(f"${ENV_SDIST}={env} is not a file; point it at {SDIST_NAME}.tar.gz")
        return Path(env)
    ext = cache_root().parent.parent / "ext"
    found = sorted(glob.glob(str(ext / f"{SDIST_NAME}.tar.gz")))
    if found:
        return Path(found[0])
    ext.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(ext),
           f"llama-cpp-python=={SDIST_VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise LlamaCppUnavailable(f"downloading the llama-cpp-python sdist failed: {e}") from e
    path = ext / f"{SDIST_NAME}.tar.gz"
    if proc.returncode != 0 or not path.is_file():
        raise LlamaCppUnavailable(f"no {SDIST_NAME}.tar.gz in {ext} and `{' '.join(cmd)}` failed: "
                                  f"{proc.stderr.strip()[-500:]}")
    return path


def source_dir() -> Path:
    """The extracted sdist (``llama_cpp/`` and ``vendor/llama.cpp/``), extracted on first use."""
    final = cache_root() / "src"
    if (final / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        return final
    archive = sdist_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=final.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{SDIST_NAME}/")
                       and "/.git/" not in m.name]
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        try:
            os.rename(tmp / SDIST_NAME, final)
        except OSError:
            if not final.is_dir():  # another process may have won the race; anything else is an error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_script() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (pure Python: needs torch, transformers, numpy)."""
    return source_dir() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def convert_hf_to_gguf(jobs: Sequence[Tuple[os.PathLike, os.PathLike, str]]) -> List[Path]:
    """Write GGUFs from transformers checkpoint folders with llama.cpp's own ``convert_hf_to_gguf.py``.

    Args:
        jobs: ``(hf_dir, out_path, outtype)`` triples; outtype is the converter's ``--outtype`` (``f32``,
            ``f16``, ``bf16``, ``q8_0``). All run in one child process (torch and transformers load once).

    Returns:
        The written paths.

    Raises:
        RuntimeError: the converter failed (its output tail is in the message).
    """
    script = convert_script()
    calls = [[str(hf), "--outfile", str(out), "--outtype", outtype] for hf, out, outtype in jobs]
    # The converter is a script with main() reading sys.argv; one interpreter runs it once per job.
    driver = ("import json, sys; sys.path.insert(0, sys.argv[1]); sys.argv = [sys.argv[1]];"
              "import convert_hf_to_gguf as c\n"
              "for argv in json.loads(sys.stdin.read()):\n"
              "    sys.argv = ['convert_hf_to_gguf.py'] + argv; c.main()\n")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter uses its own gguf-py, the version it was written against
    proc = subprocess.run([sys.executable, "-c", driver, str(script.parent)], input=json.dumps(calls),
                          capture_output=True, text=True, env=env, timeout=1800)
    outs = [Path(out) for _, out, _ in jobs]
    if proc.returncode != 0 or not all(p.is_file() for p in outs):
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return outs


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def toolchain_problem() -> Optional[str]:
    """Why llama.cpp cannot be built here (no cmake, no C or C++ compiler), or None."""
    missing = [name for name, found in (
        ("cmake", shutil.which("cmake")),
        ("a C compiler (cc/gcc/clang)", os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
         or shutil.which("clang")),
        ("a C++ compiler (c++/g++/clang++)", os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
         or shutil.which("clang++")),
    ) if not found]
    return f"cannot build llama.cpp: no {', no '.join(missing)} on PATH" if missing else None


def _bin_dir_of(folder: Path) -> Optional[Path]:
    for cand in (folder / "bin", folder):
        if (cand / "libllama.so").is_file() or (cand / "libllama.dylib").is_file():
            return cand
    return None


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build_dir(build: bool = True, jobs: int = 2) -> Path:
    """The folder holding ``libllama.so``, ``llama-bench`` and ``llama-quantize``, building llama.cpp if needed.

    Args:
        build: False only locates (raises when there is no build).
        jobs: parallel compile jobs.

    Raises:
        LlamaCppUnavailable: ``$QWEN2MS_LLAMACPP_DIR`` holds no libllama, no sdist, or no toolchain.
        LlamaCppBuildError: the build failed.
    """
    env = os.environ.get(ENV_DIR)
    if env:
        found = _bin_dir_of(Path(env))
        if found is None:
            raise LlamaCppUnavailable(f"${ENV_DIR}={env} holds no libllama.so (in it or in its bin/)")
        return found
    final = cache_root() / f"build-{_cpu_key()}"
    if (final / "BUILD_INFO.json").is_file():
        return final / "bin"
    if not build:
        raise LlamaCppUnavailable(f"llama.cpp is not built in {final}; run `python benchmarks/llamacpp.py build`")
    problem = toolchain_problem()
    if problem:
        raise LlamaCppUnavailable(problem)
    src = source_dir() / "vendor" / "llama.cpp"
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = ["cmake", "-S", str(src), "-B", str(tmp), *generator, "-DCMAKE_BUILD_TYPE=Release",
                     "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                     "-DLLAMA_OPENSSL=OFF",
                     # Relative run paths: the build folder is renamed into place after the build.
                     "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", "-DCMAKE_BUILD_RPATH=$ORIGIN"]
        nice = ["nice", "-n", "19"] if shutil.which("nice") else []
        compile_ = [*nice, "cmake", "--build", str(tmp), "--config", "Release", "-j", str(jobs),
                    "--target", *TARGETS]
        start, cpu0 = time.perf_counter(), _children_cpu()
        for cmd in (configure, compile_):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LlamaCppBuildError(f"building llama.cpp failed at `{' '.join(cmd)}`:\n"
                                         f"{(proc.stdout + proc.stderr)[-3000:]}")
        seconds = time.perf_counter() - start
        # CPU seconds do not depend on what else runs on the machine; the wall time does (nice 19).
        info = {"seconds": round(seconds, 1), "cpu_seconds": round(_children_cpu() - cpu0, 1),
                "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "jobs": jobs, "configure": configure, "build": compile_,
                "cpu": cpu_description(), "sdist": SDIST_NAME}
        (tmp / "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "BUILD_INFO.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "bin"


def build_info() -> Dict[str, object]:
    """``BUILD_INFO.json`` of the cached build ({} for a ``$QWEN2MS_LLAMACPP_DIR`` build without one)."""
    path = build_dir(build=False).parent / "BUILD_INFO.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Running llama.cpp: logits and tokens through the llama-cpp-python bindings, in a child process
# ---------------------------------------------------------------------------------------------
def _child(command: str, args: List[str], threads: int) -> str:
    """Run ``python llamacpp.py COMMAND ARGS`` against the cached build; returns its stdout.

    A child process keeps llama.cpp's OpenMP runtime apart from MindSpore's, and the ``llama_cpp`` bindings of
    the same sdist load the cached build through ``LLAMA_CPP_LIB_PATH`` (so llama-cpp-python is not installed
    and llama.cpp is not compiled a second time).
    """
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(build_dir()), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), command, *args, str(threads)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp {command} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def logits(model: os.PathLike, tokens: Sequence[int], threads: int = 2, f32_cache: bool = True):
    """llama.cpp's float32 logits ``[len(tokens), n_vocab]`` for one sequence, every position.

    Args:
        f32_cache: keep the KV cache in float32 (llama.cpp's default is float16, which adds its own rounding).
    """
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        _child("logits", [str(model), ",".join(str(int(t)) for t in tokens), str(out), str(int(f32_cache))],
               threads)
        return np.load(out)


def tokenize(model: os.PathLike, texts: Sequence[str], threads: int = 1) -> List[List[int]]:
    """llama.cpp's token ids for each text (no BOS; special tokens such as ``<|im_end|>`` parsed)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "texts.json"
        src.write_text(json.dumps(list(texts)))
        return json.loads(_child("tokenize", [str(model), str(src)], threads))


def quantize(src: os.PathLike, dst: os.PathLike, kind: str, threads: int = 2) -> Path:
    """``llama-quantize SRC DST KIND`` (e.g. ``Q4_0``, ``Q4_K_M``, ``Q6_K``) with the cached build.

    Raises:
        RuntimeError: llama-quantize failed (its output tail is in the message).
    """
    tool = build_dir() / "llama-quantize"
    proc = subprocess.run([str(tool), str(src), str(dst), kind, str(threads)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama-quantize {kind} failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    return Path(dst)


def _bindings():
    sys.path.insert(0, str(source_dir()))
    from llama_cpp import Llama

    return Llama


def _logits_main(model: str, tokens: List[int], out: str, f32_cache: bool, threads: int) -> None:
    import numpy as np

    Llama = _bindings()
    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    llm = Llama(model_path=model, n_ctx=max(32, len(tokens)), n_batch=max(32, len(tokens)),
                n_ubatch=max(32, len(tokens)), logits_all=True, n_threads=threads, n_threads_batch=threads,
                verbose=False, **kv)
    llm.eval(tokens)
    np.save(out + ".tmp.npy", np.array(llm.scores[: len(tokens)], dtype=np.float32))
    os.replace(out + ".tmp.npy", out)


def _tokenize_main(model: str, texts_path: str) -> None:
    Llama = _bindings()
    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    texts = json.loads(Path(texts_path).read_text())
    print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]))


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["build"]:
        where = build_dir()
        print(f"llama.cpp: {where}")
        print(json.dumps(build_info(), indent=2))
        return 0
    if args[:1] == ["logits"] and len(args) == 6:
        _logits_main(args[1], [int(t) for t in args[2].split(",")], args[3], args[4] == "1", int(args[5]))
        return 0
    if args[:1] == ["tokenize"] and len(args) == 4:
        _tokenize_main(args[1], args[2])
        return 0
    print(__doc__.split("Usage:")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
