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
