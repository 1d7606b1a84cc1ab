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


def test_ragged_args_pack_into_their_fields() -> None:
    # store/load pack their seven scalar arguments with one struct.pack_into; each must land in the field whose
    # address the launch's void*[] holds (the kernel reads uint64 pointers, then uint32 counts).
    from kvgen.runtime.kvcache import _RaggedArgs

    args = _RaggedArgs()
    values = (0x1122334455667788, 2**64 - 1, 3, 4, 2**32 - 1, 6, 7)
    _RaggedArgs.layout.pack_into(args, 0, *values)
    names = [name for name, _ in _RaggedArgs._fields_]
    assert tuple(getattr(args, n) for n in names) == values
    assert _RaggedArgs.layout.size <= ctypes.sizeof(_RaggedArgs)
    base = ctypes.addressof(args)
    offsets = [a - base for a in args.addresses()]
    assert offsets == [getattr(_RaggedArgs, n).offset for n in names] == [0, 8, 16, 24, 32, 36, 40]
