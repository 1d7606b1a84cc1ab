"""Float32 scalar launch arguments (decode's soft_cap and softmax_scale): checked as the float32 the kernel gets."""

from __future__ import annotations

import numpy as np
import pytest

from kvgen.errors import LaunchError
from kvgen.runtime.tensors import check_positive_float32


@pytest.mark.parametrize("value", [30.0, 30, np.float32(50.0), np.int64(7), np.float64(0.088), 1e-30])
def test_accepts_positive_reals(value) -> None:
    got = check_positive_float32("decode", "soft_cap", value, "fix")
    assert got == pytest.approx(float(value), rel=1e-6)


@pytest.mark.parametrize("value, rule", [
    (0.0, "finite and positive"),
    (-1.0, "finite and positive"),
    (float("inf"), "finite and positive"),
    (float("nan"), "finite and positive"),
    (1e308, "finite and positive"),  # finite as a double, inf as the float32 the kernel gets (inf * tanh(0) = NaN)
    (1e-50, "finite and positive"),  # 0 as a float32: the kernel would silently apply no cap
    (True, "real number"),
    ("30", "real number"),
    (None, "real number"),
])
def test_refuses_what_the_kernel_cannot_use(value, rule: str) -> None:
    with pytest.raises(LaunchError, match=rule) as err:
        check_positive_float32("decode", "soft_cap", value, "pass e.g. soft_cap=30.0")
    assert err.value.argument == "soft_cap"
    assert "soft_cap=30.0" in str(err.value)


def test_zero_dim_tensor_like_scalars() -> None:
    torch = pytest.importorskip("torch")
    assert check_positive_float32("decode", "softmax_scale", torch.tensor(0.125), "fix") == 0.125


def test_shape_specs_check_every_fixed_dim() -> None:
    # check_tensor (fast torch path and full check alike) compares the whole shape in one tuple compare when only the
    # first dim is free, and falls back to the per-dim rule otherwise or on a mismatch, so no fixed dim goes unchecked.
    from kvgen.runtime.tensors import DeviceTensor, _fixed_dims_match, _make_device_tensor

    assert _fixed_dims_match((5, 8, 128), (None, 8, 128))
    assert not _fixed_dims_match((5, 8, 64), (None, 8, 128))
    assert not _fixed_dims_match((5, 8, 128, 1), (None, 8, 128))  # rank counts
    assert _fixed_dims_match((7,), (None,))
    assert _fixed_dims_match((4, 8), (4, 8)) and not _fixed_dims_match((5, 8), (4, 8))  # a fixed first dim
    assert _fixed_dims_match((5, 7, 3), (None, None, 3)) and not _fixed_dims_match((5, 7, 4), (None, None, 3))
    assert _fixed_dims_match((4, 9), (4, None)) and not _fixed_dims_match((3, 9), (4, None))
    assert _fixed_dims_match((), ())
    made = _make_device_tensor(DeviceTensor, (16, (4, 8), (), "bfloat16", 0, None))
    assert made == DeviceTensor(16, (4, 8), (), "bfloat16", 0, None) and made.ptr == 16 and made.dtype == "bfloat16"
    assert type(made) is DeviceTensor


class _FakeDeviceArray:  # a __cuda_array_interface__ object: check_tensor's full path, no GPU needed
    def __init__(self, shape: tuple[int, ...]):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (1 << 20, False), "version": 3}


@pytest.mark.parametrize(("got", "spec", "ok"), [
    ((5, 8, 128), (None, 8, 128), True), ((5, 8, 64), (None, 8, 128), False), ((5, 1024), (None, 8, 128), False),
    ((4, 8), (4, 8), True), ((5, 8), (4, 8), False), ((5, 7, 3), (None, None, 3), True),
    ((5, 7, 4), (None, None, 3), False)])
def test_check_tensor_enforces_every_fixed_dim(got: tuple[int, ...], spec: tuple[int | None, ...], ok: bool) -> None:
    from kvgen.runtime.tensors import check_tensor

    if ok:
        assert check_tensor("store", "k", _FakeDeviceArray(got), dtype="float32", shape=spec).shape == got
    else:
        with pytest.raises(LaunchError, match=r"k.*shape must be"):
            check_tensor("store", "k", _FakeDeviceArray(got), dtype="float32", shape=spec)
