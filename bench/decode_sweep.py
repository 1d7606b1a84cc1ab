"""Tuning sweep of decode attention on the GPU: pipeline stages (a config knob) x chunk per CTA (the plan),
on a few shapes. Prints one line per point; the planner's own choice is marked. Not part of the record:
bench/decode_bench.py is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvgen.benchmark import copy_bandwidth, decode_bytes, decode_cache, graph_times, rotations  # noqa: E402
from kvgen.build import build, import_package  # noqa: E402
from kvgen.grid import load_config  # noqa: E402
from kvgen.runtime.decode_plan import DecodePlan  # noqa: E402

SHAPES = {"16x1k": [1024] * 16, "16x4k": [4096] * 16, "64x1k": [1024] * 64, "128x1k": [1024] * 128, "64x4k": [4096] * 64}
CHUNKS = (128, 256, 512, 1024, None)  # None: the planner's choice


def main() -> None:
    base = yaml.safe_load((ROOT / "configs" / "bench_decode.yaml").read_text())
    base["name"] = "sweep"
    base["grid"] = [{"cache.page_size": [16], "attention.stages": [2, 3, 4]},
                    {"cache.page_size": [16], "cache.dtype": ["float8_e4m3fn"],
                     "quantization": [{"scale_dtype": "float32", "granularity": 128}], "attention.stages": [2, 3, 4]}]
    path = Path("/tmp/kvgen-sweep.yaml")
    path.write_text(yaml.safe_dump(base))
    cfg = load_config(path)
    out = Path("/tmp/kvgen-sweep")
    build(cfg, out=out, jobs=8)
    mod = import_package(out, "kvgen_sweep")
    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    for v in mod.VARIANTS.values():
        spec = v.spec()
        for sname, lens in SHAPES.items():
            nbytes = decode_bytes(spec, lens)
            sets = []
            for _ in range(rotations(nbytes, cap=8)):
                c = decode_cache(v, lens, rng)
                q = torch.randn(len(lens), 32, 128, device="cuda", dtype=torch.bfloat16)
                sets.append((c, q, torch.empty_like(q)))
            planned = sets[0][0].decode_plan.chunk
            ops, names = [], []
            for chunk in CHUNKS:  # one cache copy per chunk (its own plan), all timed round-robin
                ch = planned if chunk is None else chunk
                views = [c.copy() for c, _, _ in sets]
                for w in views:
                    w.decode_plan = DecodePlan(w, ch, -(-max(lens) // ch), len(lens))
                ops.append([lambda c=c, q=q, o=o: c.decode(0, q, o) for c, (_, q, o) in zip(views, sets)])
                names.append(("*" if chunk is None else "") + str(ch))
            times = graph_times(ops)
            cells = [f"{n}: {t * 1e6:.1f}us {100 * nbytes / t / bw:.0f}%" for n, t in zip(names, times)]
            print(f"{spec.cache.dtype[:6]} stages {spec.attention.stages} {sname:6s} | " + " | ".join(cells), flush=True)
            del sets
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
