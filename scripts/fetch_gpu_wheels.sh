#!/usr/bin/env bash
# Download, into <repo>/.whl/, the wheels the offline GPU machine needs but lacks.
#
# Why: the GPU box (H100, x86-64, CPython 3.12, no network) ships torch 2.11 (cu130),
# triton 3.6, cupy, numpy, ml_dtypes, cuda-bindings/core, nvrtc, nvcc 13.0, ninja, jinja2,
# filelock, requests, tqdm, packaging, nvidia-ml-py. It lacks pydantic (kvgen's config layer),
# pyyaml, rich and click (kvgen's CLI), and the FlashInfer peer. Everything missing travels
# with the working tree in .whl/ (git-ignored; total well under the 64 MiB transfer cap).
#
# On the GPU machine:
#   python -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# Deliberately NOT fetched (present on the GPU image, or huge, or unused on sm_90):
#   torch, numpy, triton, nvidia-* CUDA libs, cuda-python/cuda-bindings, ninja, requests
#   (+urllib3/idna/certifi); flashinfer's optional-at-import deps cuda-tile[tileiras],
#   nvidia-cudnn-frontend and nvidia-cutlass-dsl (~100 MB; only CuTe-DSL/cuDNN/tile paths).
#
# Idempotent: a wheel already present is not downloaded again, and any other version of a
# listed package left in .whl/ is removed, so exactly one version of each package remains.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo_root/.whl"
mkdir -p "$dest"

# Keep .whl/ and .peers/ out of git without touching the tracked .gitignore.
exclude="$repo_root/.git/info/exclude"
if [ -d "$repo_root/.git" ]; then
    mkdir -p "$(dirname "$exclude")"
    touch "$exclude"
    for line in /.whl/ /.peers/; do
        grep -qxF "$line" "$exclude" || echo "$line" >>"$exclude"
    done
fi

# name==version; versions match the CPU dev venv where the package exists there.
pins=(
    # kvgen runtime deps
    pydantic==2.14.4
    pydantic-core==2.50.5          # pinned exactly by pydantic 2.14.4
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0      # pydantic 2.14.4 needs >=4.16.0; torch's image may be older
    pyyaml==6.0.4
    rich==15.0.0
    markdown-it-py==4.3.0
    mdurl==0.1.2
    pygments==2.21.0
    click==8.5.1
    filelock==4.3.1
    # FlashInfer peer (0.6.12 is what vLLM 0.24.0 pins next to torch 2.11)
    flashinfer-python==0.6.12
    apache-tvm-ffi==0.1.9          # cp312-abi3 manylinux_2_24/2_28 x86_64
    einops==0.8.2
    tabulate==0.10.0
    tqdm==4.70.1
    nvidia-ml-py==13.615.71
    packaging==26.4
)

# Wheel file names use the normalized project name (PEP 427: runs of -_. become _).
norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

platform_args=(
    --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64
)

missing=()
for pin in "${pins[@]}"; do
    name="${pin%%==*}"
    version="${pin##*==}"
    n="$(norm "$name")"
    # Drop other versions of this package (keep exactly one).
    shopt -s nullglob nocaseglob
    have=0
    for f in "$dest"/*.whl; do
        base="$(basename "$f")"
        fname="$(norm "${base%%-*}")"
        fver="$(echo "$base" | cut -d- -f2)"
        if [ "$fname" = "$n" ]; then
            if [ "$fver" = "$version" ]; then
                have=1
            else
                echo "removing stale $base"
                rm -f -- "$f"
            fi
        fi
    done
    shopt -u nullglob nocaseglob
    [ "$have" = 1 ] || missing+=("$pin")
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "downloading: ${missing[*]}"
    python3 -m pip download "${platform_args[@]}" -d "$dest" "${missing[@]}"
else
    echo "all ${#pins[@]} wheels already present"
fi

count="$(find "$dest" -maxdepth 1 -type f -name '*.whl' | wc -l)"
if [ "$count" -ne "${#pins[@]}" ]; then
    echo "warning: $dest holds $count wheels, expected ${#pins[@]} (stray files?)" >&2
fi
ls -1 "$dest"
total_bytes="$(find "$dest" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{s+=$1} END {print s+0}')"
awk -v b="$total_bytes" -v c="$count" 'BEGIN {printf "total: %d wheels, %.2f MiB\n", c, b/1048576}'
