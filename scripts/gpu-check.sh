#!/usr/bin/env bash
# Runs on the GPU machine (offline): installs the carried wheels, runs the GPU tests, compute-sanitizer on a
# subset and the benchmarks, and prints a short summary. Usage: scripts/gpu-check.sh [tests|sanitize|bench|decode|ab|abtree|floor|sweep|trace|prep|profile|ncu|cli|all]...
# Wheels come from scripts/fetch_gpu_wheels.sh (run on a machine with internet) into .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvgen-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KVGEN_CACHE_DIR=/tmp/kvgen-cache
if [ -d .whl ] && [ ! -f /tmp/site/.kvgen-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.kvgen-installed || { echo "wheel install failed"; exit 1; }
fi
# Our wheels go after the image's packages so torch's own dependencies keep their versions.
export PYTHONPATH="$PWD:${PYTHONPATH:-}:/tmp/site"
# Install the FlashInfer modules built on the CPU machine (scripts/prebuild_flashinfer.sh, carried in
# .peers/flashinfer_cache) into the package's AOT folder, so the benchmarks skip the ~70 s nvcc JIT of the peers.
# FI_PREBUILT=0 leaves them out on a fresh machine (FlashInfer then JIT-builds its modules); a warm machine keeps
# what an earlier call installed.
if [[ ${FI_PREBUILT:-1} == 1 && -d .peers/flashinfer_cache && ! -f /tmp/site/.kvgen-fi-prebuilt ]]; then
  python3 -c 'import sys; sys.path.insert(0, "bench"); import peers
print("FlashInfer prebuilt modules:", [p.parent.name[:40] for p in peers.flashinfer_install_prebuilt(".peers/flashinfer_cache")])' \
    && touch /tmp/site/.kvgen-fi-prebuilt
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
summary=()
for step in "${@:-all}"; do
  if [[ $step == tests || $step == all ]]; then
    python3 -m pytest -m gpu tests/gpu -q -rf -s -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 40
    summary+=("gpu tests: $(tail -n 1 "$OUT/gpu-tests.log")")
  fi
  if [[ $step == sanitize || $step == all ]]; then
    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 python3 -m pytest -m gpu tests/gpu -q -x -p no:cacheprovider \
      -k "${SANITIZE_K:-p16 and (bf16 or e4m3) and not graph}" 2>&1 | tee "$OUT/sanitizer.log" | tail -n 8
    summary+=("compute-sanitizer memcheck: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer.log" | tail -n 2 | tr '\n' ' ')")
  fi
  if [[ $step == bench || $step == all ]]; then
    python3 bench/store_bench.py --out "$OUT/store_bench.md" ${STORE_BENCH_ARGS:-} 2>&1 | tee "$OUT/store-bench.log" | tail -n 40
    summary+=("store bench: $OUT/store_bench.md")
  fi
  if [[ $step == ncu ]]; then  # stall reasons and throughput of the kernels being tuned (bench/ncu_probe.py)
    for c in ${NCU_CASES:-store-bf16 store-fp8 decode-bf16-16x1k decode-bf16-64x4k decode-fp8-16x1k}; do
      echo "---- ncu $c"
      sections=()
      for sec in ${NCU_SECTIONS:-SpeedOfLight Occupancy LaunchStats WarpStateStats MemoryWorkloadAnalysis}; do sections+=(--section "$sec"); done
      [[ -n ${NCU_METRICS:-} ]] && sections=(--metrics "$NCU_METRICS")  # raw metrics instead of sections
      ncu --kernel-name regex:"${NCU_KERNELS:-_(store|decode)\$}" --launch-skip 2 --launch-count 1 "${sections[@]}" \
        python3 bench/ncu_probe.py "$c" 2>&1 | grep -vE '^==PROF==|^\s*$' | tee -a "$OUT/ncu.log" | tail -n "${NCU_TAIL:-90}"
    done
    summary+=("ncu: $OUT/ncu.log")
  fi
  if [[ $step == cli ]]; then  # kvgen bench end to end on one shape
    python3 -m kvgen.cli bench "${CLI_CONFIG:-configs/bench_decode.yaml}" --out "$OUT/kvgen-bench" --shape 16x1024 --no-skewed --early-reads 2>&1 | tail -n 12
    summary+=("kvgen bench: exit ${PIPESTATUS[0]}")
  fi
  if [[ $step == sweep ]]; then  # decode tuning: stages x chunk (bench/decode_sweep.py)
    python3 bench/decode_sweep.py 2>&1 | tee "$OUT/decode-sweep.log" | tail -n 40
  fi
  if [[ $step == trace ]]; then  # decode per-CTA timeline (bench/decode_trace.py)
    python3 bench/decode_trace.py 2>&1 | tee "$OUT/decode-trace.log" | tail -n 60
  fi
  if [[ $step == floor ]]; then  # what a bare streaming kernel reaches for the targets' byte counts (bench/floor_bench.py)
    python3 bench/floor_bench.py --out "$OUT/floor_bench.md" 2>&1 | tee "$OUT/floor-bench.log" | tail -n 12
    summary+=("floors: $OUT/floor_bench.md")
  fi
  if [[ $step == abtree ]]; then  # the same decode_bench on a baseline tree (.base/: `git archive <rev>`) and on this one
    for tree in .base .; do
      [[ -d $tree/bench ]] || { echo "abtree: no $tree/bench (make .base with git archive and carry it)"; continue; }
      name=$([[ $tree == . ]] && echo new || echo base)
      (cd "$tree" && python3 bench/decode_bench.py --no-peers --out "$OUT/abtree-$name.md" ${ABTREE_ARGS:-} 2>&1 | tail -n 3)
    done
    summary+=("abtree: $OUT/abtree-base.md vs $OUT/abtree-new.md")
  fi
  if [[ $step == prep ]]; then  # step preparation from an engine's block table, per-layer tensors (bench/step_prep_bench.py)
    python3 bench/step_prep_bench.py --out "$OUT/step_prep_bench.md" 2>&1 | tee "$OUT/step-prep.log" | tail -n 20
    summary+=("step prep: $OUT/step_prep_bench.md")
  fi
  if [[ $step == profile ]]; then
    python3 bench/host_profile.py 2>&1 | tee "$OUT/host-profile.log"
  fi
  if [[ $step == ab ]]; then  # decode.cuh compile-time knobs (DECODE_DEFINES) vs the default build, same caches
    ok=()
    i=0
    for d in ${DECODE_DEFINES:-}; do  # each alone first: a knob that faults must not take the whole A/B down
      i=$((i + 1)); probe="$OUT/ab-probe-$i.log"  # plain names: '=' and ',' do not come back from the device
      # 16 x 1k (split plan) and 64 x 4k (single split); decode_bench compares each build's output with the default's.
      timeout 150 python3 bench/decode_bench.py --out /tmp/ab-probe.md --no-peers --variant '*p16*' \
        --shapes 16x1024 64x4096 --defines "$d" >"$probe" 2>&1
      rc=$?
      if [[ $rc == 0 ]] && ! grep -qiE "error|mismatch" "$probe"; then
        ok+=("$d")
      else
        echo "knob $d refused (exit $rc, $probe): $(grep -m1 -iE 'error|mismatch' "$probe")"
      fi
    done
    timeout "${DECODE_BENCH_TIMEOUT:-480}" python3 bench/decode_bench.py --out "$OUT/decode_ab.md" --variant '*p16*' \
      --shapes ${AB_SHAPES:-16x1024 128x1024 128x4096} --defines ${ok[@]+"${ok[@]}"} 2>&1 | tee "$OUT/decode-ab.log" | grep "^|"
    summary+=("decode A/B: $OUT/decode_ab.md (knobs that ran: ${ok[*]})")
  fi
  if [[ $step == decode ]]; then
    timeout "${DECODE_BENCH_TIMEOUT:-480}" python3 bench/decode_bench.py --out "$OUT/decode_bench.md" ${DECODE_BENCH_ARGS:-} 2>&1 | tee "$OUT/decode-bench.log" | tail -n 60
    summary+=("decode bench: $OUT/decode_bench.md")
  fi
done
echo "==== summary"
printf '%s\n' "${summary[@]}"
