"""CUDA driver access: the primary context shared with PyTorch/CuPy, cubin modules, kernel launches."""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path
from typing import Any

_lock = threading.Lock()


def cu():  # noqa: ANN201 - the cuda.bindings.driver module, imported on first use
    from cuda.bindings import driver

    return driver


def check(result: Any) -> Any:
    """Unwrap a cuda-bindings (status, *values) tuple, raising on any error."""
    res = result if isinstance(result, tuple) else (result,)
    status = res[0]
    if int(status) != 0:
        d = cu()
        _, msg = d.cuGetErrorString(status)
        raise RuntimeError(f"CUDA driver error {status!r}: {msg.decode() if msg else ''}")
    if len(res) == 1:
        return None
    return res[1] if len(res) == 2 else res[1:]


@functools.cache
def context(device: int) -> Any:
    """Retain the device's primary context (the one PyTorch and CuPy use) and make it current."""
    d = cu()
    check(d.cuInit(0))
    dev = check(d.cuDeviceGet(device))
    ctx = check(d.cuDevicePrimaryCtxRetain(dev))
    check(d.cuCtxSetCurrent(ctx))
    return ctx


def ensure_current(device: int) -> None:
    d = cu()
    ctx = context(device)
    cur = check(d.cuCtxGetCurrent())
    if int(cur) != int(ctx):
        check(d.cuCtxSetCurrent(ctx))


def device_arch(device: int) -> str:
    d = cu()
    context(device)
    major = check(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device))
    minor = check(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))
    return {(9, 0): "sm_90a", (10, 0): "sm_100a", (8, 0): "sm_80"}.get((major, minor), f"sm_{major}{minor}")


@functools.cache
def _raw_launch() -> Any:
    """libcuda's cuLaunchKernel through ctypes: about 1 µs per call, where the cuda-bindings wrapper
    costs 4-5 µs (it converts every argument). Only used with handles cuda-bindings created."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernel
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                   ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, 4 pad bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h), for cuLaunchKernelEx
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


@functools.cache
def _raw_launch_ex() -> Any:
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


class Kernel:
    """One kernel of a loaded cubin; launches take a pre-packed void*[] so the host cost stays small."""

    def __init__(self, module: Any, name: str, dynamic_smem: int = 0):
        d = cu()
        self.name = name
        self.function = check(d.cuModuleGetFunction(module, name.encode()))
        self.dynamic_smem = dynamic_smem  # its opt-in limit is set by Module.kernel, the one place Kernels are made
        self._handle = int(self.function)
        self._launch = _raw_launch()

    def allow_dynamic_smem(self, nbytes: int) -> None:
        """Opt the function in to nbytes of dynamic shared memory (needed past 48 KB). The limit belongs to the
        CUfunction, which every Kernel of the same name shares (Module.kernel keeps it at their largest)."""
        if nbytes > 48 * 1024:
            d = cu()
            check(d.cuFuncSetAttribute(self.function, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       nbytes))

    def launcher(self, params: ctypes.Array) -> Any:
        """cuLaunchKernel of this kernel bound to one packed argument array (a void*[] of pointers to each
        argument's bytes, kept alive by the caller): fire(grid, block, stream)."""
        raw, handle, smem, addr = self._launch, self._handle, self.dynamic_smem, ctypes.addressof(params)

        def fire(grid: tuple[int, int, int], block: tuple[int, int, int], stream: int) -> None:
            err = raw(handle, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem, stream, addr, None)
            if err != 0:
                check((cu().CUresult(err),))

        return fire

    def dependent_launcher(self, params: ctypes.Array) -> Any:
        """As launcher, but each launch is a programmatic dependent of the previous kernel on the stream (sm_90+,
        cuLaunchKernelEx with PROGRAMMATIC_STREAM_SERIALIZATION): this grid may start once that one triggers
        griddepcontrol.launch_dependents (or exits), and must execute griddepcontrol.wait before touching what it
        may still be reading or writing (common.cuh pdl_wait). Graph capture keeps the programmatic edge."""
        attr = _LaunchAttribute()
        attr.id = int(cu().CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        cfg = _LaunchConfig(sharedMemBytes=self.dynamic_smem, attrs=ctypes.pointer(attr), numAttrs=1)
        raw, handle, addr, cfg_ref = _raw_launch_ex(), self._handle, ctypes.addressof(params), ctypes.byref(cfg)
        # The config's grid, block and stream as last written: a steady caller (same step size, same stream) skips
        # the seven ctypes field writes, about 0.5 us of the eager host cost, for two tuple compares.
        last: list[Any] = [None, None, None]

        def fire(grid: tuple[int, int, int], block: tuple[int, int, int], stream: int) -> None:
            if grid != last[0]:  # kept as tuples: a caller's list mutated in place must not compare equal
                cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = last[0] = tuple(grid)
            if block != last[1]:
                cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = last[1] = tuple(block)
            if stream != last[2]:
                cfg.hStream = last[2] = stream
            err = raw(cfg_ref, handle, addr, None)
            if err != 0:
                check((cu().CUresult(err),))

        fire.keep = (attr, cfg)  # the config points at the attribute: both live as long as the closure
        return fire


def sm_count(device: int) -> int:
    d = cu()
    return int(check(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device)))


def resident_blocks(kernel: Kernel, block_threads: int, device: int) -> int:
    """CTAs of `kernel` the whole GPU holds at once (occupancy per SM times the SM count)."""
    per_sm = check(cu().cuOccupancyMaxActiveBlocksPerMultiprocessor(kernel.function, block_threads, kernel.dynamic_smem))
    return max(1, int(per_sm)) * sm_count(device)


class Module:
    def __init__(self, cubin: bytes, device: int):
        ensure_current(device)
        self.handle = check(cu().cuModuleLoadData(cubin))
        self.kernels: dict[tuple[str, int], Kernel] = {}

    def kernel(self, name: str, dynamic_smem: int = 0) -> Kernel:
        """The kernel `name` launched with `dynamic_smem` bytes (one Kernel per size: decode launches one-group
        and multi-group CTAs of the same function)."""
        k = self.kernels.get((name, dynamic_smem))
        if k is None:
            k = self.kernels[(name, dynamic_smem)] = Kernel(self.handle, name, dynamic_smem)
            # The function's opt-in limit covers the largest size asked for: a smaller one made later must not
            # lower it below a larger one's.
            k.allow_dynamic_smem(max(v.dynamic_smem for (n, _), v in self.kernels.items() if n == name))
        return k


_modules: dict[tuple[str, int], Module] = {}


def load_module(path: Path, device: int) -> Module:
    key = (str(path), device)
    with _lock:
        m = _modules.get(key)
        if m is None:
            m = _modules[key] = Module(Path(path).read_bytes(), device)
        return m


def pack(*values: ctypes._SimpleCData | ctypes.Structure | int) -> tuple[ctypes.Array, list[Any]]:
    """A void*[] with one entry per kernel argument. Ints are taken as addresses of already-packed bytes."""
    keep: list[Any] = []
    arr = (ctypes.c_void_p * len(values))()
    for i, v in enumerate(values):
        if isinstance(v, int):
            arr[i] = v
        else:
            keep.append(v)
            arr[i] = ctypes.addressof(v)
    return arr, keep
