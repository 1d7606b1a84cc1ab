#!/usr/bin/env bash
# Build FlashInfer 0.6.12's append + decode modules for sm_90a on a CPU machine (no GPU needed),
# into <repo>/.peers/flashinfer_cache (git-ignored), so GPU sessions need not spend their time on
# nvcc.
#
# Why: FlashInfer JIT-compiles each kernel module with nvcc + ninja on first use. On the GPU box
# that is ~67 s of a 16-core machine per fresh session; here it is ~10 min on 2 cores, but costs
# no GPU time. The modules are plain shared objects (tvm-ffi bindings, sm_90a SASS) that depend
# only on libcudart.so.13 / libcuda.so.1, so they load on the GPU box when copied into the
# installed package's AOT folder (which skips ninja entirely):
#   python - <<'PY'
#   import sys; sys.path.insert(0, "bench"); import peers
#   peers.flashinfer_install_prebuilt(".peers/flashinfer_cache")
#   PY
#
# What is built: see bench/peers.py::flashinfer_prebuild (page module; batch decode and fa2
# prefill modules for q=bf16, kv in {bf16, e4m3}, head_dim 128; XQA only for the page sizes /
# GQA groups given in XQA_PAGE_SIZES / XQA_GROUPS, none by default).
#
# Needs: nvcc 13.0 (CUDA_HOME, default /usr/local/cuda-13.0), ninja, a host c++, and a Python
# with torch (CPU build is fine), apache-tvm-ffi 0.1.9 and flashinfer-python 0.6.12. Unless
# PREBUILD_PYTHON names such an interpreter, a throwaway venv is made at $PREBUILD_VENV
# (default /tmp/kvgen_fi_prebuild_venv) from the local torch CPU wheel if one exists
# (/opt/wheels/torch-*+cpu-*), else PyPI's torch (large download), plus .whl/flashinfer.
#
# Options: --generate-only  render sources and write build.ninja files, compile nothing.
# Env: MAX_JOBS (ninja -j, default nproc), XQA_PAGE_SIZES="16 64", XQA_GROUPS="4 8",
#      FLASHINFER_NVCC_THREADS (nvcc --threads per job, default 1).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$repo_root/.peers/flashinfer_cache"
generate_only=0
[ "${1:-}" = "--generate-only" ] && generate_only=1

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
export PATH="$CUDA_HOME/bin:$PATH"
command -v nvcc >/dev/null || { echo "nvcc not found (set CUDA_HOME)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "no host c++ compiler" >&2; exit 1; }

python="${PREBUILD_PYTHON:-}"
if [ -z "$python" ]; then
    venv="${PREBUILD_VENV:-/tmp/kvgen_fi_prebuild_venv}"
    python="$venv/bin/python"
    if ! "$python" -c "import torch, tvm_ffi, flashinfer, ninja" >/dev/null 2>&1; then
        echo "creating build venv $venv"
        python3 -m venv "$venv"
        fi_wheel="$(ls "$repo_root"/.whl/flashinfer_python-0.6.12-*.whl 2>/dev/null || true)"
        [ -n "$fi_wheel" ] || fi_wheel="flashinfer-python==0.6.12"
        local_torch="$(ls /opt/wheels/torch-*+cpu-cp"$("$python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"-*.whl 2>/dev/null | tail -1 || true)"
        "$python" -m pip install -q ${local_torch:-torch}
        # apache-tvm-ffi resolves to this interpreter's wheel (cp311 here, cp312-abi3 on the GPU box).
        "$python" -m pip install -q apache-tvm-ffi==0.1.9 ninja numpy filelock "packaging>=24.2" \
            requests tqdm nvidia-ml-py einops tabulate click jinja2
        "$python" -m pip install -q --no-deps "$fi_wheel"
    fi
fi

export FLASHINFER_CUDA_ARCH_LIST=9.0a
export FLASHINFER_WORKSPACE_BASE="$cache"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
mkdir -p "$cache"

# FlashInfer links every module with -lcuda (from $CUDA_HOME/lib64/stubs). A machine without a
# driver and without the toolkit's stubs gets an empty stand-in with the driver's soname, and the
# module resolves its cu* symbols from the real driver when it is loaded on the GPU box (shared
# objects may keep undefined symbols at link time). The stand-in defines none of them, so the
# linker's default --as-needed would drop it and the module would not name libcuda.so.1: XQA's
# e4m3 module then died with "undefined symbol: cuTensorMapEncodeTiled" on the GPU (session 5).
# --no-as-needed keeps the NEEDED entry; the check after the build refuses any module without it.
if ! ls "$CUDA_HOME"/lib64/libcuda.so "$CUDA_HOME"/lib64/stubs/libcuda.so >/dev/null 2>&1 \
    && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
    stubs="$cache/stubs"
    mkdir -p "$stubs"
    if [ ! -f "$stubs/libcuda.so" ]; then
        echo "no libcuda.so here: linking against an empty stub ($stubs/libcuda.so, soname libcuda.so.1)"
        echo 'void kvgen_libcuda_stub(void) {}' | c++ -x c - -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so"
    fi
    export FLASHINFER_EXTRA_LDFLAGS="${FLASHINFER_EXTRA_LDFLAGS:-} -L$stubs -Wl,--push-state,--no-as-needed -lcuda -Wl,--pop-state"
fi

"$python" - "$repo_root" "$generate_only" <<'PY'
import os
import sys
import time

repo_root, generate_only = sys.argv[1], sys.argv[2] == "1"
sys.path.insert(0, os.path.join(repo_root, "bench"))
import peers  # noqa: E402

pages = [int(x) for x in os.environ.get("XQA_PAGE_SIZES", "16").split()]
groups = [int(x) for x in os.environ.get("XQA_GROUPS", "").split()]
t0 = time.time()
paths = peers.flashinfer_prebuild(
    "9.0a",
    workspace_base=os.environ["FLASHINFER_WORKSPACE_BASE"],
    xqa_page_sizes=pages,
    xqa_group_sizes=groups,
    build=not generate_only,
    verbose=True,
)
print(f"{'generated' if generate_only else 'built'} {len(paths)} modules in {time.time() - t0:.0f} s")
total = 0
for p in paths:
    size = p.stat().st_size if p.exists() else 0
    total += size
    print(f"  {size / 2**20:8.2f} MiB  {p}")
print(f"  {total / 2**20:8.2f} MiB  total")
PY

[ "$generate_only" = 1 ] && exit 0
# Every module that calls the driver API must load libcuda.so.1 itself (see the stub note above).
bad=0
while IFS= read -r so; do
    # Process substitution, not a pipe: under pipefail, grep -q exiting early can kill nm with SIGPIPE and turn
    # a match into a failure.
    if grep -qE ' cu[A-Z]' < <(nm -D --undefined-only "$so") && ! grep -q 'NEEDED.*libcuda\.so\.1' < <(readelf -d "$so"); then
        echo "module calls the driver API but does not name libcuda.so.1: $so" >&2
        echo "  fix: patchelf --add-needed libcuda.so.1 '$so' (or rebuild with this script)" >&2
        bad=1
    fi
done < <(find "$cache" -name '*.so' -not -path '*/stubs/*')
exit $bad
