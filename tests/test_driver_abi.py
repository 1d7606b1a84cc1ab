"""Layouts kvgen passes to libcuda through ctypes (no GPU needed): a wrong offset would launch garbage."""

from __future__ import annotations

import ctypes

from kvgen.runtime.driver import _LaunchAttribute, _LaunchConfig


def test_launch_config_matches_cuda_h() -> None:
    # cuda.h (CUDA 13.0): CUlaunchConfig = 7 unsigned ints, then CUstream hStream (8-byte aligned),
    # CUlaunchAttribute *attrs, unsigned int numAttrs.
    assert _LaunchConfig.hStream.offset == 32
    assert _LaunchConfig.attrs.offset == 40
    assert _LaunchConfig.numAttrs.offset == 48
    assert ctypes.sizeof(_LaunchConfig) == 56


def test_launch_attribute_matches_cuda_h() -> None:
    # CUlaunchAttribute = CUlaunchAttributeID id; char pad[8 - sizeof(id)]; a 64-byte CUlaunchAttributeValue union.
    assert _LaunchAttribute.id.offset == 0
    assert _LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_LaunchAttribute) == 72
