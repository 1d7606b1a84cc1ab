"""Fit and check the decode planner's time model (kvgen/runtime/decode_time_model.py) on batches timed under
both plans.

Input: logs of `bench/decode_bench.py --no-peers --plan-ab` (its `[plan]` lines give each batch's lengths; its rows
give the planner's plan, the split-K plan and, where the skew test chose split-K, the grouped plan it turned down),
e.g. the session 19 sweeps in bench/skew_s19/. For each batch the script rebuilds both plans with the planner's own
functions, fits the model's constants by least squares on the log of the times (scipy), and reports the regret of
each rule: its choice's time over the better plan's, summed over the batches (two-fold cross-validated for the
model; the row-ratio limit it replaced needs no fit).

Run on the CPU machine: `python3 bench/fit_decode_model.py bench/skew_s19/*.log` (needs scipy, not a dependency
of kvgen).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvgen.runtime import decode_plan as dp  # noqa: E402
from kvgen.runtime import decode_time_model as tm  # noqa: E402

SMS = 132
MAX_GROUPS = {"bfloat16": 2, "float8_e4m3fn": 4}  # the H200 benchmark kernels' geometry (head 128)
PLAN = re.compile(r"\[plan\] (.*?), kvgen: (\d+) splits x (\d+) groups, chunk (\d+)"
                  r"(?:, modelled grouped/split-K ([\d.]+))?(?:, modelled µs[^;]*)?; lengths \[(.*)\]")
OLD_LIMIT = 1.5  # the rule the model replaced: split-K where the row ratio exceeded it
HELD_OUT = ("_v3_", "_v4_", "_pg_")  # session 19's sweeps run after the fit (seeds 3-5): scored, never fitted


@dataclass
class Batch:
    dtype: str
    heads: int
    lens: np.ndarray  # context lengths + the step's token
    ratio: float  # the skew gate's row ratio
    grouped_us: float
    split_k_us: float
    splits: int = 0
    groups: int = 0
    chunk: int = 0

    @property
    def row_bytes(self) -> int:
        return 2 * 128 * (1 if self.dtype.startswith("float8") else 2)


def batch_of(plan: re.Match, rows: dict[str, tuple[str, float]], heads: int) -> Batch | None:
    """One `[plan]` line and its rows (kernel -> (cache tag, µs)) as a batch timed under both plans, if it is."""
    if plan[5] is None or "kvgen" not in rows:
        return None  # no skew gate computed (not a grouped candidate), or no timing
    tag, us = rows["kvgen"]
    grouped = us if int(plan[3]) > 1 else rows.get("kvgen grouped plan", (None, None))[1]
    split_k = rows.get("kvgen split-K plan", (None, None))[1]
    if grouped is None or split_k is None:
        return None
    lens = np.array([int(x) for x in plan[6].split(",")], dtype=np.int64)  # as the planner saw them
    return Batch(tag.split()[0], heads, lens, float(plan[5]), grouped, split_k)


def load(paths: list[Path]) -> list[Batch]:
    """Each `[plan]` line with the rows that follow it (one cache's rows for that batch): the planner's row, the
    split-K plan's and, where the skew test chose split-K, the grouped plan's."""
    out = []
    for path in paths:
        text = path.read_text()
        heads = int(re.search(r"Hq=\d+, H=(\d+)", text)[1])
        groups: list[tuple[re.Match, dict]] = []
        for line in text.splitlines():
            if m := PLAN.match(line):
                groups.append((m, {}))
            elif line.startswith("| ") and not line.startswith("| cache") and groups:
                cells = [c.strip() for c in line.split("|")]
                if cells[3] == groups[-1][0][1]:
                    groups[-1][1][cells[4]] = (cells[1], float(cells[5]))
        out += [b for b in (batch_of(m, rows, heads) for m, rows in groups) if b is not None]
    for b in out:  # both plans as the planner builds them
        pairs = len(b.lens) * b.heads
        b.groups = dp.grouped_groups(pairs, SMS, MAX_GROUPS[b.dtype])
        b.splits = dp.grouped_splits(int(b.lens.max()), pairs, SMS, b.groups)
        b.chunk = dp._best_chunk(b.lens, b.heads, SMS * MAX_GROUPS[b.dtype], dp.SPLIT_K_OVERHEAD_ROWS, 64)[0]
    return [b for b in out if b.groups > 1]


NAMES = ("launch_us", "dram_tb_s", "sm_gb_s", "group_el_per_us_8bit", "group_el_per_us_16bit", "combine_us",
         "combine_us_per_split", "split_k_cta_rows", "grouped_group_rows")


def set_model(p: np.ndarray) -> None:
    """Write the constants into decode_time_model (launch_us is common to both plans: it cancels in the choice)."""
    tm.MODEL_DRAM_BYTES_PER_US, tm.MODEL_SM_BYTES_PER_US = p[1] * 1e6, p[2] * 1e3
    tm.MODEL_GROUP_ELEMENTS_PER_US = {1: p[3] * 1e3, 2: p[4] * 1e3}
    tm.MODEL_COMBINE_US, tm.MODEL_COMBINE_US_PER_SPLIT = p[5], p[6]
    tm.MODEL_SPLIT_K_CTA_ROWS, tm.MODEL_GROUPED_GROUP_ROWS = p[7], p[8]


def modelled(b: Batch, launch_us: float) -> tuple[float, float]:
    fp8_chunk = 0 if b.dtype == "bfloat16" else dp.host_chunk(int(b.lens.max()), b.splits, b.groups)
    g = tm.grouped_time_us(b.lens, b.heads, b.splits, b.groups, fp8_chunk, b.row_bytes, 128, SMS)
    s = tm.split_k_time_us(b.lens, b.heads, b.chunk, SMS * MAX_GROUPS[b.dtype], SMS, b.row_bytes, 128)
    return launch_us + g, launch_us + s


def fit(batches: list[Batch]) -> np.ndarray:
    from scipy.optimize import least_squares

    def residuals(p: np.ndarray) -> np.ndarray:
        set_model(p)
        pred = [modelled(b, p[0]) for b in batches]
        return np.log([x for g, s in pred for x in (g, s)]) - np.log([x for b in batches for x in (b.grouped_us, b.split_k_us)])

    start = np.array([2.9, 4.0, 60, 12.8, 23.4, 1.3, 0.1, 110, 100])
    lo, hi = [0, 0.5, 5, 1, 1, 0, 0, 0, 0], [50, 10, 500, 500, 500, 20, 2, 1000, 1000]
    return least_squares(residuals, start, bounds=(lo, hi)).x


def regret(batches: list[Batch], choose_grouped) -> np.ndarray:
    return np.array([(b.grouped_us if choose_grouped(b) else b.split_k_us) / min(b.grouped_us, b.split_k_us) - 1
                     for b in batches])


def model_choice(p: np.ndarray | None):
    """The planner's choice with constants p (None: decode_plan's own)."""
    def choose(b: Batch) -> bool:
        if p is not None:
            set_model(p)
        g, s = modelled(b, 0.0)
        return b.ratio <= dp.GROUPED_SKEW_GATE or g <= s
    return choose


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--holdout", nargs="*", default=list(HELD_OUT),
                    help="logs whose name holds one of these are scored, never fitted")
    ap.add_argument("--shipped", action="store_true", help="score decode_plan's constants as they are; fit nothing")
    args = ap.parse_args()
    held_out = [p for p in args.logs if any(h in p.name for h in args.holdout)]
    batches, held = load([p for p in args.logs if p not in held_out]), load(held_out)
    print(f"{len(batches)} batches to fit, {len(held)} held out, each timed under both plans")

    def report(name: str, r: np.ndarray) -> None:
        print(f"  {name}: summed regret {r.sum():.2f}, largest {100 * r.max():.0f}%, batches over 3% {(r > 0.03).sum()}")

    for label, data in (("fitted logs", batches), ("held-out logs", held)):
        if data:
            print(label)
            report("row-ratio limit 1.5", regret(data, lambda b: b.ratio <= OLD_LIMIT))
            if args.shipped:
                report("time model, shipped constants", regret(data, model_choice(None)))
    if args.shipped:
        return
    folds = [batches[0::2], batches[1::2]]
    report("fitted logs, time model 2-fold cross-validated",
           np.concatenate([regret(folds[1 - i], model_choice(fit(folds[i]))) for i in (0, 1)]))
    p = fit(batches)
    report("fitted logs, time model fitted on all of them", regret(batches, model_choice(p)))
    if held:
        report("held-out logs, time model fitted on the others", regret(held, model_choice(p)))
    print("constants:", ", ".join(f"{n} {v:.4g}" for n, v in zip(NAMES, p)))


if __name__ == "__main__":
    main()
