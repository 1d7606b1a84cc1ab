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


def test_dependent_launcher_rewrites_the_config_only_when_it_changes(monkeypatch) -> None:
    # The PDL launcher keeps one CUlaunchConfig per launch and skips the field writes when grid, block and stream
    # repeat; every launch must still see exactly the values it was called with (a fake cuLaunchKernelEx records
    # what the config held at each call).
    from kvgen.runtime import driver

    seen: list[tuple[int, ...]] = []

    def fake_launch(cfg_ref, handle, params, extra) -> int:  # noqa: ANN001
        c = cfg_ref._obj
        seen.append((c.gridDimX, c.gridDimY, c.gridDimZ, c.blockDimX, c.blockDimY, c.blockDimZ, c.hStream or 0,
                     c.sharedMemBytes, c.numAttrs))
        return 0

    monkeypatch.setattr(driver, "_raw_launch_ex", lambda: fake_launch)
    kernel = driver.Kernel.__new__(driver.Kernel)  # no module or GPU: only what dependent_launcher reads
    kernel._handle, kernel.dynamic_smem = 1234, 4096
    params = (ctypes.c_void_p * 1)()
    fire = kernel.dependent_launcher(params)
    grid = [3, 1, 1]
    calls = [((3, 1, 1), (256, 1, 1), 7), ((3, 1, 1), (256, 1, 1), 7), ((9, 2, 1), (256, 1, 1), 7),
             ((9, 2, 1), (128, 1, 1), 8), ((3, 1, 1), (128, 1, 1), 8)]
    for g, b, st in calls:
        fire(g, b, st)
    fire(grid, (128, 1, 1), 8)
    grid[0] = 5  # mutated in place: must not be mistaken for the grid already written
    fire(grid, (128, 1, 1), 8)
    expect = [(*g, *b, st, 4096, 1) for g, b, st in calls] + [(3, 1, 1, 128, 1, 1, 8, 4096, 1),
                                                              (5, 1, 1, 128, 1, 1, 8, 4096, 1)]
    assert seen == expect
