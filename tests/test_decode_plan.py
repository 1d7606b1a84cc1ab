"""The decode split-K planner (pure host code, no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from kvgen.runtime.decode_plan import choose_chunk


def makespan(lengths: np.ndarray, heads: int, slots: int, chunk: int, overhead: int = 96) -> int:
    ctas = heads * int(np.sum(-(-lengths // chunk)))
    return -(-ctas // slots) * (min(chunk, int(lengths.max())) + overhead)


@pytest.mark.parametrize("lengths", [[1025] * 16, [4097] * 64, [1025] * 128, [16385], [1] * 7, [3, 9000, 17]])
@pytest.mark.parametrize("slots", [132, 264, 396])
def test_chunk_is_a_tile_multiple_and_optimal_under_the_model(lengths: list[int], slots: int) -> None:
    lens = np.array(lengths)
    chunk = choose_chunk(lens, heads=8, slots=slots)
    assert chunk % 64 == 0 and chunk >= 64
    best = min(makespan(lens, 8, slots, t * 64) for t in range(1, -(-lens.max() // 64) + 1))
    assert makespan(lens, 8, slots, chunk) == best


def test_small_batch_fills_one_wave_instead_of_a_partial_third() -> None:
    # 16 requests x 8 KV heads x 1025 rows on 264 resident CTAs: two splits each (256 CTAs, one wave),
    # where a fixed 256-row chunk gave 640 CTAs (2.4 waves).
    assert choose_chunk(np.array([1025] * 16), heads=8, slots=264) == 576


def test_single_long_request_is_split_across_the_gpu() -> None:
    chunk = choose_chunk(np.array([16385]), heads=8, slots=264)
    assert 8 * -(-16385 // chunk) >= 200
