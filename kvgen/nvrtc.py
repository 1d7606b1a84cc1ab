"""NVRTC through cuda-python: one rendered source -> one cubin for one arch, headers from the wheels."""

from __future__ import annotations

import functools
import importlib.metadata
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .render import INCLUDE_DIR


@dataclass(frozen=True)
class CompileResult:
    cubin: bytes
    log: str
    seconds: float
    resources: dict[str, dict[str, int]]  # kernel symbol -> {"registers", "spill_stores", "spill_loads", "smem"}


@functools.lru_cache(maxsize=1)
def cuda_include_dirs() -> tuple[str, ...]:
    """CUDA runtime and CCCL headers from the pip wheels (never from a system CUDA install)."""
    from cuda import pathfinder

    dirs = []
    for lib in ("cudart", "cccl"):
        found = pathfinder.locate_nvidia_header_directory(lib)
        if found is None:
            raise RuntimeError(
                f"CUDA headers for {lib!r} not found; install the header wheels: "
                "pip install 'cuda-toolkit[nvrtc,cudart,cccl]==13.0.2'"
            )
        dirs.append(found.abs_path)
    return tuple(dirs)


@functools.lru_cache(maxsize=1)
def toolchain_identity() -> str:
    """Everything about the compiler that can change the cubin: NVRTC version and header wheel versions."""
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    parts = [f"nvrtc={major}.{minor}"]
    for dist in ("nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cuda-cccl", "cuda-bindings"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=none")
    return "|".join(parts)


_extra_defines: tuple[str, ...] = ()


@contextmanager
def defines(*names: str) -> Iterator[None]:
    """Compile with extra preprocessor definitions ("KVGEN_KV_PREFETCH=256") while the block runs: the
    benchmarks' A/B builds of the headers' compile-time knobs. They enter the cache key like every option.
    Process-wide on purpose (a build's worker threads must see them), so overlapping blocks in two threads
    would see each other's definitions: use it from one thread at a time."""
    global _extra_defines
    saved = _extra_defines
    _extra_defines = (*saved, *names)
    try:
        yield
    finally:
        _extra_defines = saved


def nvrtc_options(arch: str) -> list[str]:
    return [
        f"--gpu-architecture={arch}",  # a real arch: cubin (SASS), never PTX
        "-std=c++17",
        "--ptxas-options=--verbose",  # per-kernel registers and spills, kept in the manifest
        "--maxrregcount=128",  # without it ptxas capped these kernels at 32 registers and spilled
        "-default-device",
        *[f"-D{d}" for d in _extra_defines],
        *[f"-I{d}" for d in (str(INCLUDE_DIR), *cuda_include_dirs())],
    ]


def key_options(arch: str) -> list[str]:
    """Options as they enter the cache key: absolute include paths are venv-specific, so they are left out
    (the headers behind them are keyed by content and wheel version instead)."""
    return [o for o in nvrtc_options(arch) if not o.startswith("-I")]


def parse_resources(log: str) -> dict[str, dict[str, int]]:
    """Registers and spill bytes per kernel from ptxas' verbose report."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            out[current] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current]["spill_stores"], out[current]["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            out[current]["smem"] = int(m.group(1))
    return out


class NvrtcFailure(Exception):
    def __init__(self, log: str):
        self.log = log
        super().__init__(log)


def _nvrtc_compile(source: str, options: list[str], name: str, output: str) -> tuple[bytes, str]:
    """NVRTC's `output` ("CUBIN" or "PTX") and its log for one source; NvrtcFailure carries the log."""
    from cuda.bindings import nvrtc

    def check(res):  # noqa: ANN001, ANN202 - cuda-bindings returns (status, *values)
        status = res[0]
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {nvrtc.nvrtcGetErrorString(status)[1].decode()}")
        return res[1] if len(res) == 2 else res[1:]

    opts = [o.encode() for o in options]
    prog = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, buf))
        log = buf.rstrip(b"\0").decode(errors="replace")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcFailure(log)
        size = check(getattr(nvrtc, f"nvrtcGet{output}Size")(prog))
        out = b" " * size
        check(getattr(nvrtc, f"nvrtcGet{output}")(prog, out))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return out, log


def compile_cubin(source: str, arch: str, name: str = "kernels.cu") -> CompileResult:
    t0 = time.perf_counter()
    cubin, log = _nvrtc_compile(source, nvrtc_options(arch), name, "CUBIN")
    if len(cubin) == 0 or not cubin.startswith(b"\x7fELF"):
        raise NvrtcFailure(f"NVRTC returned an empty or non-ELF cubin for {arch} (was a compute_ arch given?)\n{log}")
    return CompileResult(cubin=cubin, log=log, seconds=time.perf_counter() - t0, resources=parse_resources(log))


def compile_ptx(source: str, arch: str, name: str = "kernels.cu") -> bytes:
    """PTX of one source for the virtual arch of `arch` (sm_80 -> compute_80), NUL-terminated for cuModuleLoadData.
    The driver compiles it for the GPU at hand, so the code an arch's source selects (`__CUDA_ARCH__` as compiled
    for, e.g. no TMA and no programmatic launches on sm_80) runs on a newer GPU: how the GPU tests run the sm_80
    path on an H100 / H200, whose SASS an sm_80 cubin is not."""
    virtual = "compute_" + arch.removeprefix("sm_")
    options = [o if not o.startswith("--gpu-architecture=") else f"--gpu-architecture={virtual}"
               for o in nvrtc_options(arch) if not o.startswith("--ptxas-options")]
    ptx, _ = _nvrtc_compile(source, options, name, "PTX")
    return ptx.rstrip(b"\0") + b"\0"
