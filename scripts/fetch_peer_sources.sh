#!/usr/bin/env bash
# Extract vLLM 0.24.0's Triton KV-cache kernels into <repo>/.peers/vllm_triton/ (git-ignored).
#
# Why: kvgen benchmarks its store and decode kernels side by side with vLLM's on the offline
# H100. The vLLM wheel is ~280 MB (two CUDA binaries of 110 and 153 MB), too big to ship, and
# the GPU box has no network. Its Triton kernels, though, need only torch + triton, so we keep
# the three pure-Python kernel files (~75 KB) and stub the handful of vLLM modules they import.
# The files stay out of git: they are vLLM's code (Apache-2.0), used only as a benchmark peer.
#
# Result (importable with `.peers/vllm_triton` on sys.path, no vLLM install):
#   vllm/v1/attention/ops/triton_reshape_and_cache_flash.py   (verbatim from the wheel)
#   vllm/v1/attention/ops/triton_unified_attention.py         (verbatim)
#   vllm/v1/attention/ops/triton_attention_helpers.py         (verbatim)
#   vllm/{envs,logger}.py, vllm/platforms, vllm/triton_utils, vllm/utils/torch_utils.py,
#   vllm/model_executor/layers/quantization/utils/quant_utils.py,
#   vllm/v1/kv_cache_interface.py                             (stubs written here)
#   SOURCE.txt                                                (wheel name + sha256 + file list)
#
# Idempotent: skips the download when SOURCE.txt records the same wheel and every file is
# present; pass --force to redo. Set VLLM_WHEEL=/path/to/vllm-0.24.0-*.whl to reuse a wheel.
set -euo pipefail

VLLM_VERSION=0.24.0
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo_root/.peers/vllm_triton"
force=0
[ "${1:-}" = "--force" ] && force=1

# Keep .whl/ and .peers/ out of git without touching the tracked .gitignore.
exclude="$repo_root/.git/info/exclude"
if [ -d "$repo_root/.git" ]; then
    mkdir -p "$(dirname "$exclude")"
    touch "$exclude"
    for line in /.whl/ /.peers/; do
        grep -qxF "$line" "$exclude" || echo "$line" >>"$exclude"
    done
fi

kernel_files=(
    vllm/v1/attention/ops/triton_reshape_and_cache_flash.py
    vllm/v1/attention/ops/triton_unified_attention.py
    vllm/v1/attention/ops/triton_attention_helpers.py
)

all_present() {
    [ -f "$dest/SOURCE.txt" ] || return 1
    grep -q "^wheel: vllm-$VLLM_VERSION-" "$dest/SOURCE.txt" || return 1
    for f in "${kernel_files[@]}"; do [ -f "$dest/$f" ] || return 1; done
    return 0
}

if [ "$force" = 0 ] && all_present; then
    echo "vLLM $VLLM_VERSION Triton sources already in $dest (use --force to redo)"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    wheel="${VLLM_WHEEL:-}"
    if [ -z "$wheel" ]; then
        echo "downloading vllm==$VLLM_VERSION (~280 MB) into $tmp"
        python3 -m pip download --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 \
            -d "$tmp" "vllm==$VLLM_VERSION" >"$tmp/pip.log" 2>&1 \
            || { cat "$tmp/pip.log" >&2; exit 1; }
        wheel="$(ls "$tmp"/vllm-"$VLLM_VERSION"-*.whl)"
    fi
    sha="$(sha256sum "$wheel" | cut -d' ' -f1)"
    rm -rf "$dest"
    mkdir -p "$dest"
    python3 - "$wheel" "$dest" "${kernel_files[@]}" <<'PY'
import sys
import zipfile
from pathlib import Path

wheel, dest, *names = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    for name in names:
        out = Path(dest) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(zf.read(name))
PY
    {
        echo "wheel: $(basename "$wheel")"
        echo "sha256: $sha"
        echo "license: Apache-2.0 (vLLM project); kept out of git, benchmark peer only"
        echo "verbatim files:"
        for f in "${kernel_files[@]}"; do echo "  $f $(sha256sum "$dest/$f" | cut -d' ' -f1)"; done
        echo "every other .py under this folder is a stub written by scripts/fetch_peer_sources.sh"
    } >"$dest/SOURCE.txt"
    # The wheel (and the temp dir) go away with the EXIT trap.
fi

# ---------------------------------------------------------------------------------------------
# Stubs: just enough of vLLM for the three kernel files to import with torch + triton only.
# Written on every run so a stub fix lands without --force.
# ---------------------------------------------------------------------------------------------
w() { mkdir -p "$(dirname "$dest/$1")"; cat >"$dest/$1"; }

for pkg in vllm vllm/v1 vllm/v1/attention vllm/v1/attention/ops vllm/utils \
    vllm/model_executor vllm/model_executor/layers vllm/model_executor/layers/quantization \
    vllm/model_executor/layers/quantization/utils; do
    mkdir -p "$dest/$pkg"
    [ -f "$dest/$pkg/__init__.py" ] || echo '"""Stub package (kvgen peer benchmark; not vLLM)."""' >"$dest/$pkg/__init__.py"
done

w vllm/envs.py <<'PY'
"""Stub of vllm.envs: only the flag the Triton attention kernels read."""

import os

VLLM_BATCH_INVARIANT: bool = bool(int(os.getenv("VLLM_BATCH_INVARIANT", "0")))
PY

w vllm/logger.py <<'PY'
"""Stub of vllm.logger: plain stdlib logging."""

import logging


def init_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
PY

w vllm/platforms/__init__.py <<'PY'
"""Stub of vllm.platforms: a CUDA-only current_platform backed by torch.cuda."""

import torch


class _CudaPlatform:
    device_type = "cuda"

    @staticmethod
    def _capability(device_id: int = 0) -> tuple[int, int] | None:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_capability(device_id)

    def get_device_capability(self, device_id: int = 0) -> tuple[int, int] | None:
        return self._capability(device_id)

    def has_device_capability(self, capability, device_id: int = 0) -> bool:
        cap = self._capability(device_id)
        if cap is None:
            return False
        if isinstance(capability, tuple):
            return cap >= capability
        return cap[0] * 10 + cap[1] >= capability

    def is_device_capability(self, capability, device_id: int = 0) -> bool:
        cap = self._capability(device_id)
        if cap is None:
            return False
        if isinstance(capability, tuple):
            return cap == capability
        return cap[0] * 10 + cap[1] == capability

    def is_device_capability_family(self, capability: int, device_id: int = 0) -> bool:
        cap = self._capability(device_id)
        if cap is None:
            return False
        return (cap[0] * 10 + cap[1]) // 10 == capability // 10

    def is_cuda(self) -> bool:
        return True

    def is_cuda_alike(self) -> bool:
        return True

    def is_rocm(self) -> bool:
        return False

    def is_xpu(self) -> bool:
        return False

    def is_cpu(self) -> bool:
        return False

    def is_fp8_fnuz(self) -> bool:
        return False

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn


current_platform = _CudaPlatform()
PY

w vllm/triton_utils/__init__.py <<'PY'
"""Stub of vllm.triton_utils: the real triton (required)."""

import triton
import triton.language as tl
import triton.language.extra.libdevice as tldevice

HAS_TRITON = True
LOG2E = 1.4426950408889634
LOGE2 = 0.6931471805599453

__all__ = ["HAS_TRITON", "triton", "tl", "tldevice", "LOG2E", "LOGE2"]
PY

w vllm/utils/torch_utils.py <<'PY'
"""Stub of vllm.utils.torch_utils: the one helper the reshape kernel imports (same logic)."""


def is_quantized_kv_cache(kv_cache_dtype: str) -> bool:
    return (
        kv_cache_dtype.startswith("fp8")
        or kv_cache_dtype.endswith("per_token_head")
        or kv_cache_dtype == "nvfp4"
    )
PY

w vllm/model_executor/layers/quantization/utils/quant_utils.py <<'PY'
"""Stub of vLLM's quant_utils: FP8 dtype and range (same logic as vLLM on CUDA)."""

import torch

from vllm.platforms import current_platform

FP8_DTYPE = current_platform.fp8_dtype()


def get_fp8_min_max() -> tuple[float, float]:
    if current_platform.is_fp8_fnuz():
        return -224.0, 224.0
    finfo = torch.finfo(current_platform.fp8_dtype())
    return finfo.min, finfo.max
PY

w vllm/v1/kv_cache_interface.py <<'PY'
"""Stub of vllm.v1.kv_cache_interface: KVQuantMode and its string mapping (same values)."""

from enum import IntEnum


class KVQuantMode(IntEnum):
    NONE = 0
    FP8_PER_TENSOR = 1
    INT8_PER_TOKEN_HEAD = 2
    FP8_PER_TOKEN_HEAD = 3
    NVFP4 = 4

    @property
    def is_per_token_head(self) -> bool:
        return self in (KVQuantMode.INT8_PER_TOKEN_HEAD, KVQuantMode.FP8_PER_TOKEN_HEAD)

    @property
    def is_nvfp4(self) -> bool:
        return self == KVQuantMode.NVFP4


def get_kv_quant_mode(kv_cache_dtype: str) -> KVQuantMode:
    if kv_cache_dtype == "int8_per_token_head":
        return KVQuantMode.INT8_PER_TOKEN_HEAD
    if kv_cache_dtype == "fp8_per_token_head":
        return KVQuantMode.FP8_PER_TOKEN_HEAD
    if kv_cache_dtype == "nvfp4":
        return KVQuantMode.NVFP4
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype.startswith("fp8"):
        return KVQuantMode.FP8_PER_TENSOR
    return KVQuantMode.NONE
PY

echo "wrote $dest:"
(cd "$dest" && find . -type f -name '*.py' | sort | sed 's|^\./|  |')
du -sh "$dest" | cut -f1 | sed 's/^/total: /'
