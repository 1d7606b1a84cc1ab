"""Uniform view of device tensors from PyTorch, CuPy, or anything with __cuda_array_interface__ / DLPack, and the
checks of launch arguments (tensors and float32 scalars)."""

from __future__ import annotations

import ctypes
import math
from typing import Any, NamedTuple

import numpy as np

from ..errors import LaunchError

_TORCH_NAMES = {
    "torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16",
    "torch.float8_e4m3fn": "float8_e4m3fn", "torch.float8_e5m2": "float8_e5m2",
    "torch.float8_e8m0fnu": "float8_e8m0fnu", "torch.uint8": "uint8", "torch.int32": "int32",
    "torch.uint32": "uint32", "torch.int64": "int64", "torch.uint16": "uint16", "torch.int16": "int16",
}
_TYPESTR = {"<f4": "float32", "<f2": "float16", "<u4": "uint32", "<i4": "int32", "|u1": "uint8", "<u1": "uint8",
            "<i8": "int64", "<u2": "uint16", "<i2": "int16"}
_NBYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e8m0fnu": 1,
           "uint8": 1, "int32": 4, "uint32": 4, "int64": 8, "uint16": 2, "int16": 2}
# Raw integer views a framework without the float type (CuPy has no bf16/fp8) may hand in for it.
_SAME_BITS = {"bfloat16": {"uint16", "int16"}, "float8_e4m3fn": {"uint8"}, "float8_e5m2": {"uint8"},
              "float8_e8m0fnu": {"uint8"}, "uint32": {"int32"}}


class DeviceTensor(NamedTuple):  # a NamedTuple: built on every launch, so it must be cheap
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    dtype: str
    device: int
    obj: Any  # the original object, kept alive while a launch uses it

    def is_contiguous(self) -> bool:
        expect = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expect:
                return False
            expect *= size
        return True


_torch_dtype_names: dict[Any, str] = {}


def _torch_name(dtype: Any) -> str:
    name = _torch_dtype_names.get(dtype)
    if name is None:
        name = _torch_dtype_names[dtype] = _TORCH_NAMES.get(str(dtype), str(dtype))
    return name


def as_device_tensor(x: Any) -> DeviceTensor:
    mod = type(x).__module__
    if mod.startswith("torch"):
        if x.device.type != "cuda":
            raise TypeError(f"tensor is on {x.device}, not a CUDA device")
        return DeviceTensor(x.data_ptr(), tuple(x.shape), tuple(x.stride()), _torch_name(x.dtype),
                            x.device.index or 0, x)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(cai["shape"])
        typestr = cai["typestr"]
        dtype = _TYPESTR.get(typestr, typestr)
        nb = _NBYTES.get(dtype, 1)
        if cai.get("strides") is None:
            strides, acc = [], 1
            for s in reversed(shape):
                strides.append(acc)
                acc *= s
            strides = tuple(reversed(strides))
        else:
            strides = tuple(s // nb for s in cai["strides"])
        device = getattr(getattr(x, "device", None), "id", 0) or 0
        return DeviceTensor(int(cai["data"][0]), shape, strides, dtype, device, x)
    if hasattr(x, "__dlpack__"):
        import torch

        return as_device_tensor(torch.from_dlpack(x))
    raise TypeError(f"{type(x).__name__} is not a CUDA tensor (torch, CuPy, __cuda_array_interface__ or DLPack)")


def check_tensor(kernel: str, name: str, x: Any, *, dtype: str | tuple[str, ...], shape: tuple[int | None, ...] | None = None,
                 device: int | None = None, contiguous: bool = True, align: int = 16) -> DeviceTensor:
    """Validate one launch argument, raising LaunchError that names the rule, the value and a fix."""
    fast = _torch_fast_path(x, dtype, shape, device, contiguous, align)
    if fast is not None:
        return fast
    try:
        t = as_device_tensor(x)
    except TypeError as e:
        raise LaunchError(kernel, name, "must be a CUDA tensor", type(x).__name__, str(e)) from None
    allowed = (dtype,) if isinstance(dtype, str) else dtype
    if t.dtype not in allowed and not any(t.dtype in _SAME_BITS.get(a, ()) for a in allowed):
        raise LaunchError(kernel, name, f"dtype must be {' or '.join(allowed)}", t.dtype, f"convert with .to({allowed[0]})")
    if shape is not None:
        if not _fixed_dims_match(t.shape, shape):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise LaunchError(kernel, name, f"shape must be {want}", list(t.shape), "reshape or allocate with that shape")
    if device is not None and t.device != device:
        raise LaunchError(kernel, name, f"must be on cuda:{device} (the cache's device)", f"cuda:{t.device}",
                          f"move it with .to('cuda:{device}')")
    if contiguous and not t.is_contiguous():
        raise LaunchError(kernel, name, "must be contiguous (row-major)", list(t.strides), "call .contiguous()")
    if t.ptr % align:
        raise LaunchError(kernel, name, f"data pointer must be {align}-byte aligned", hex(t.ptr),
                          "pass a freshly allocated tensor, not an offset slice")
    return t


def check_positive_float32(kernel: str, name: str, value: Any, fix: str) -> float:
    """A scalar launch argument the kernel receives as a float32 that must be finite and > 0: the check runs on the
    float32 it becomes (1e308 turns into inf, 1e-50 into 0). Accepts what float() converts (NumPy and 0-d tensor
    scalars included) except bool (NumPy's too) and text."""
    try:
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise TypeError
        as_f32 = ctypes.c_float(float(value)).value
    except (TypeError, ValueError, OverflowError):
        raise LaunchError(kernel, name, "must be a real number", value, fix) from None
    if not (math.isfinite(as_f32) and as_f32 > 0.0):
        raise LaunchError(kernel, name, "must be finite and positive as a float32", value, fix)
    return as_f32


_torch_tensor: type | None = None  # torch.Tensor, once a torch tensor was seen (torch stays an optional import)
_make_device_tensor = tuple.__new__  # DeviceTensor without NamedTuple's Python-level __new__ (half the cost)


def _fixed_dims_match(got: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    """Same rank, and every dim `want` fixes (not None) equal in `got`. The launch specs (the first dim free, or
    none: store / load / decode inputs) take one C-level tuple compare (torch.Size is a tuple); any other spec, or a
    mismatch, the per-dim rule."""
    if len(got) != len(want):
        return False
    if got == ((got[0], *want[1:]) if want and want[0] is None else want):  # slicing a torch.Size costs more
        return True
    return all(w is None or w == g for w, g in zip(want, got))


def _torch_fast_path(x: Any, dtype: str | tuple[str, ...], shape: tuple[int | None, ...] | None, device: int | None,
                     contiguous: bool, align: int) -> DeviceTensor | None:
    """The common case (a valid CUDA torch tensor, not a subclass) in a few C calls; None sends anything unusual
    to the full check, which produces the error message. Runs on every eager launch, so every call here counts."""
    global _torch_tensor
    if type(x) is not _torch_tensor:
        if _torch_tensor is not None or not type(x).__module__.startswith("torch"):
            return None
        import torch

        _torch_tensor = torch.Tensor
        if type(x) is not _torch_tensor:
            return None
    name = _torch_name(x.dtype)
    if (name != dtype) if isinstance(dtype, str) else (name not in dtype):
        return None
    xs = x.shape
    if shape is not None and not _fixed_dims_match(xs, shape):
        return None
    dev = x.get_device()  # -1 for a CPU tensor
    ptr = x.data_ptr()
    if dev < 0 or (device is not None and dev != device) or (contiguous and not x.is_contiguous()) or ptr % align:
        return None
    return _make_device_tensor(DeviceTensor, (ptr, xs, (), name, dev, x))


def to_host(x: Any) -> Any:
    """Host NumPy copy of a device tensor (synchronizes; for setup, never per launch)."""
    import torch

    if type(x).__module__.startswith("torch"):
        t = x
    elif hasattr(x, "__cuda_array_interface__"):
        t = torch.as_tensor(x, device="cuda")
    else:
        t = torch.from_dlpack(x)
    return t.detach().cpu().numpy()
