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


def test_free_first_dim_shape_specs_compare_their_tail() -> None:
    # check_tensor's torch fast path compares shape[1:] in one go only when the first dim alone is free; any other
    # spec (a fixed first dim, a free later dim) keeps the per-dim loop, so no fixed dim goes unchecked.
    from kvgen.runtime.tensors import DeviceTensor, _free_first_tail, _make_device_tensor

    assert _free_first_tail((None, 8, 128)) == (8, 128)
    assert _free_first_tail((None,)) == ()
    assert _free_first_tail((4, 8)) is None
    assert _free_first_tail((None, None, 3)) is None
    assert _free_first_tail((4, None)) is None
    assert _free_first_tail(()) is None
    made = _make_device_tensor(DeviceTensor, (16, (4, 8), (), "bfloat16", 0, None))
    assert made == DeviceTensor(16, (4, 8), (), "bfloat16", 0, None) and made.ptr == 16 and made.dtype == "bfloat16"
    assert type(made) is DeviceTensor
