"""What the best possible kernel reaches for the byte counts of the store and decode targets, in the same graph
method as the benchmarks (bench/NOTES.md, "Floors"). The targets are fractions of a 256 MiB copy; a short
kernel also pays its launch, its ramp-up (the first bytes arrive about a microsecond after the start) and its
tail, so the same fraction is harder at 34 MB than at 256 MiB. This measures those floors directly:

- `stream`: a plain streaming kernel over contiguous memory, 16-byte loads, several in flight per thread,
  grid = resident CTAs: reads R bytes and writes W bytes (the store's shape: bf16 in, bf16 or FP8 out). Every
  grid size and unroll of a small sweep is timed and the best is kept, so the floor is the kernel's best, not
  one guess;
- `stream + empty`: the same followed by an empty kernel (decode's partial + combine launches);
- `copy_`: torch's device copy of the same bytes;
- `empty`: one empty kernel (the graph method's own floor).

Run on the GPU machine: `python3 bench/floor_bench.py` (scripts/gpu-check.sh floor). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cupy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvgen.benchmark import copy_bandwidth, graph_times, print_report, rotations  # noqa: E402

SOURCE = r"""
extern "C" __global__ void stream(const uint4* __restrict__ src, unsigned char* __restrict__ dst, unsigned long long n16,
                                  int write_bytes, unsigned int* __restrict__ sink) {
  // n16 16-byte units; each thread keeps UNROLL loads in flight per trip of the grid-stride loop.
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  unsigned int acc = 0;
  for (unsigned long long base = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; base < n16;
       base += stride * UNROLL) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const unsigned long long i = base + u * stride;
      v[u] = i < n16 ? __ldcs(src + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const unsigned long long i = base + u * stride;
      if (i >= n16) continue;
      if (write_bytes == 16) reinterpret_cast<uint4*>(dst)[i] = v[u];
      else if (write_bytes == 8) reinterpret_cast<uint2*>(dst)[i] = make_uint2(v[u].x ^ v[u].y, v[u].z ^ v[u].w);
      else acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
  }
  if (write_bytes == 0 && acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads; practically never written
}
extern "C" __global__ void empty() {}
"""

# (label, bytes read, bytes written per 16 read): the shapes of the targets.
CASES = [
    ("decode bf16 16 x 1k (K+V read)", 67_108_864, 0),
    ("decode FP8 16 x 1k (K+V read)", 33_554_432, 0),
    ("decode bf16 16 x 4k (K+V read)", 268_435_456, 0),
    ("store bf16 8192 tok (read 33.5 MB, write 33.5 MB)", 33_554_432, 16),
    ("store FP8 8192 tok (read 33.5 MB, write 16.8 MB)", 33_554_432, 8),
    ("store bf16 64 tok (read 0.26 MB, write 0.26 MB)", 262_144, 16),
]
UNROLLS = (2, 4, 8)
BLOCKS_PER_SM = (2, 4, 8)
THREADS = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    kernels = {u: cupy.RawModule(code=SOURCE, options=(f"-DUNROLL={u}", "-std=c++17")) for u in UNROLLS}
    empty = kernels[UNROLLS[0]].get_function("empty")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = cupy.zeros(1, dtype=cupy.uint32)
    bw = copy_bandwidth()

    def on_torch_stream(fn):
        def run() -> None:
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                fn()
        return run

    def stream_op(unroll: int, blocks: int, src, dst, n16: int, wb: int):
        f = kernels[unroll].get_function("stream")
        return on_torch_stream(lambda: f((blocks,), (THREADS,), (src, dst, cupy.uint64(n16), cupy.int32(wb), sink)))

    lines = [f"Floors, {torch.cuda.get_device_name()}; copy_ bandwidth {bw / 1e12:.3f} TB/s (256 MiB, read+write).", "",
             "| bytes of | moved | best streaming kernel | + an empty kernel | torch copy_ of the same bytes |",
             "|---|---|---|---|---|"]
    empty_t = graph_times([[on_torch_stream(lambda: empty((1,), (32,), ()))] * 20])[0]
    for label, rbytes, wb in CASES:
        wbytes = rbytes * wb // 16
        moved = rbytes + wbytes
        n = rotations(moved, cap=256 if moved < (64 << 20) else 16)  # the store bench's rotation
        srcs = [torch.randint(0, 255, (rbytes,), dtype=torch.uint8, device="cuda") for _ in range(n)]
        dsts = [torch.empty(max(wbytes, 16), dtype=torch.uint8, device="cuda") for _ in range(n)]
        n16 = rbytes // 16
        ops, names = [], []
        for unroll in UNROLLS:
            for bps in BLOCKS_PER_SM:
                ops.append([stream_op(unroll, bps * sms, cupy.asarray(s), cupy.asarray(d), n16, wb) for s, d in zip(srcs, dsts)])
                names.append((unroll, bps))
        times = graph_times(ops)
        best = min(range(len(times)), key=lambda i: times[i])
        unroll, bps = names[best]
        pair = [[stream_op(unroll, bps * sms, cupy.asarray(s), cupy.asarray(d), n16, wb),
                 on_torch_stream(lambda: empty((1,), (32,), ()))] for s, d in zip(srcs, dsts)]
        # copy_ of moved / 2 bytes reads and writes `moved` bytes (moved <= 2 * rbytes, so the source slice exists).
        half = [torch.empty(moved // 2, dtype=torch.uint8, device="cuda") for _ in range(n)]
        copies = [lambda a=a, b=s[: moved // 2]: a.copy_(b) for a, s in zip(half, srcs)]
        t_pair, t_copy = graph_times([[lambda p=p: (p[0](), p[1]()) for p in pair], copies])

        def pct(t: float, moved: int = moved) -> str:
            return f"{t * 1e6:.2f} µs, {100 * moved / t / bw:.1f}%"

        lines.append(f"| {label} | {moved / 1e6:.1f} MB | {pct(times[best])} (unroll {unroll}, {bps} CTAs/SM) | "
                     f"{pct(t_pair)} | {pct(t_copy)} |")
        print(lines[-1], flush=True)
        del srcs, dsts, half
        torch.cuda.empty_cache()
    lines += ["", f"One empty kernel per graph node: {empty_t * 1e6:.2f} µs."]
    print_report(lines, args.out)


if __name__ == "__main__":
    main()
