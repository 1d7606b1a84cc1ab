"""Peer-benchmark adapters: FlashInfer and vLLM KV-cache ops as zero-argument callables.

Why this module exists: kvgen's store and decode kernels are reported side by side with the
kernels that serving stacks actually use, on the same tensors. Each ``make_*`` function does all
the setup work (page-table conversion, CSR metadata, planning, scale expansion, dtype casts,
workspace allocation, a warm-up call that triggers JIT / Triton compilation) and returns a
callable that only launches the peer's kernel(s) on torch's *current* stream. The caller times
that callable eagerly (CUDA events) or captures it in ``torch.cuda.graph`` and times replays, so
that host overhead is measured or removed the same way for every peer.

Peers are imported lazily: importing this module needs neither torch nor any peer, so CPU-only
tooling can import it. When a peer cannot be imported, the adapter raises ``PeerUnavailable``
with the reason, and a benchmark can skip that peer and go on.

Peers and versions (what vLLM 0.24.0 pins next to torch 2.11):
  * FlashInfer 0.6.12 (``flashinfer-python``; kernels JIT-built with nvcc + ninja on first use,
    see ``flashinfer_prebuild`` / ``flashinfer_install_prebuilt``), bindings via apache-tvm-ffi.
  * vLLM 0.24.0 Triton kernels ``triton_reshape_and_cache_flash`` and ``unified_attention``,
    extracted with their stub modules into ``<repo>/.peers/vllm_triton`` by
    ``scripts/fetch_peer_sources.sh`` (vLLM itself is not installed).
  * torch ``index_copy_`` as the naive scatter baseline.

Layouts. kvgen's MAX layout is ``[num_pages(+1), KVD=2, L, P, H, D]``. With ``L == 1`` (or a
single layer sliced out) that is exactly FlashInfer's / vLLM's combined NHD cache
``[num_pages, 2, P, H, D]``, so the same storage can be handed to every peer as a view.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLASHINFER_WORKSPACE_BYTES",
    "PeerUnavailable",
    "REPO_ROOT",
    "VLLM_TRITON_DIR",
    "flashinfer_install_prebuilt",
    "flashinfer_prebuild",
    "make_flashinfer_append",
    "make_flashinfer_decode",
    "make_flashinfer_xqa_decode",
    "make_torch_index_copy",
    "make_vllm_reshape_and_cache",
    "make_vllm_unified_attention",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Repository root (the parent of ``bench/``); peer sources live under ``.peers/`` there."""

VLLM_TRITON_DIR = REPO_ROOT / ".peers" / "vllm_triton"
"""Where ``scripts/fetch_peer_sources.sh`` puts vLLM's Triton kernels and their stubs."""

FLASHINFER_WORKSPACE_BYTES = 128 * 1024 * 1024
"""Float workspace FlashInfer recommends for its decode wrappers (split-KV partials, XQA scratch)."""

FLASHINFER_APPEND_HEAD_DIMS = (64, 128, 256, 512)
"""Head dims FlashInfer's ``AppendPagedKVCache`` dispatches on (``DISPATCH_HEAD_DIM``)."""

XQA_PAGE_SIZES = (16, 32, 64, 128)
"""Page sizes XQA compiles for (``TOKENS_PER_PAGE`` is a compile-time constant there)."""

VLLM_NUM_PAR_SOFTMAX_SEGMENTS = 16
"""vLLM TRITON_ATTN's split count for its 3-D (split-KV) decode kernel (``triton_attn.py``)."""

VLLM_MIN_LAUNCH_GRID_SIZE_2D = 128
"""vLLM TRITON_ATTN uses the 3-D kernel while ``num_seqs <= 128 // num_kv_heads``."""

Launch = Callable[[], None]


class PeerUnavailable(Exception):
    """A peer library cannot be imported here; the message says why (skip this peer)."""


# --------------------------------------------------------------------------------------------
# lazy imports
# --------------------------------------------------------------------------------------------


def _torch() -> Any:
    """Import torch lazily so this module imports on machines without it."""
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken CUDA install raising OSError
        raise PeerUnavailable(f"torch cannot be imported: {type(exc).__name__}: {exc}") from exc
    return torch


def _flashinfer() -> Any:
    """Import FlashInfer (and the submodules used here), mapping any failure to PeerUnavailable.

    Failures seen in practice are not only ImportError: tvm-ffi raises RuntimeError/OSError when
    its shared library does not load, and FlashInfer raises RuntimeError for version mismatches.
    """
    try:
        import flashinfer
        import flashinfer.decode
        import flashinfer.page
    except Exception as exc:
        raise PeerUnavailable(
            f"flashinfer cannot be imported: {type(exc).__name__}: {exc} "
            "(install .whl/flashinfer_python-0.6.12 and apache_tvm_ffi-0.1.9)"
        ) from exc
    return flashinfer


def _vllm_triton(module: str) -> Any:
    """Import one of vLLM's Triton kernel modules from ``.peers/vllm_triton`` (no vLLM install).

    The folder holds the verbatim kernel files plus stub ``vllm.*`` modules; it is put first on
    ``sys.path`` so the stubs win. A real vLLM imported earlier in the process would shadow them,
    which is reported rather than silently mixed.
    """
    import importlib

    if not (VLLM_TRITON_DIR / "vllm" / "__init__.py").is_file():
        raise PeerUnavailable(
            f"vLLM Triton sources missing at {VLLM_TRITON_DIR}; run scripts/fetch_peer_sources.sh"
        )
    loaded = sys.modules.get("vllm")
    if loaded is not None:
        origin = Path(getattr(loaded, "__file__", "") or "").resolve()
        if VLLM_TRITON_DIR.resolve() not in origin.parents:
            raise PeerUnavailable(f"a different vllm package is already imported from {origin}")
    path = str(VLLM_TRITON_DIR)
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise PeerUnavailable(f"{module} cannot be imported: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# setup helpers (run once, outside the timed callable)
# --------------------------------------------------------------------------------------------


def _as_int32(t: torch.Tensor) -> torch.Tensor:
    """Page ids / lengths as int32 on the same device (MAX's LUT and cache_lengths are uint32).

    uint32 is reinterpreted bit for bit (ids < 2**31), since torch supports few ops on uint32.
    """
    torch = _torch()
    if t.dtype == torch.int32:
        return t
    if t.dtype == torch.uint32:
        return t.view(torch.int32)
    return t.to(torch.int32)


def _csr_page_table(
    page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense page table ``[B, cols]`` + lengths -> FlashInfer CSR (indptr, indices, last_page_len).

    Request b owns pages ``page_table[b, :ceil(len_b / P)]``; entries past that (MAX's null-page
    padding) are dropped. ``last_page_len`` is in ``[1, P]``, or 0 for an empty request, which is
    FlashInfer's convention (``get_seq_lens``). All outputs are int32 on the page table's device.
    """
    torch = _torch()
    table = _as_int32(page_table)
    lens = _as_int32(seq_lens).to(device=table.device, dtype=torch.int64)
    pages = (lens + page_size - 1) // page_size
    if int(pages.max().item()) > table.shape[1]:
        raise ValueError(
            f"page_table has {table.shape[1]} columns but a request needs {int(pages.max().item())} pages"
        )
    cols = torch.arange(table.shape[1], device=table.device)
    indices = table[cols[None, :] < pages[:, None]].contiguous()  # row-major: request by request
    indptr = torch.zeros(table.shape[0] + 1, dtype=torch.int32, device=table.device)
    indptr[1:] = torch.cumsum(pages, 0).to(torch.int32)
    last = torch.where(pages > 0, lens - (pages - 1) * page_size, torch.zeros_like(lens))
    return indptr, indices.to(torch.int32), last.to(torch.int32).contiguous()


def _combined_nhd(kv_cache: torch.Tensor) -> torch.Tensor:
    """Accept ``[N, 2, P, H, D]`` or kvgen's ``[N, 2, 1, P, H, D]`` (L == 1); return the 5-D view."""
    if kv_cache.ndim == 6:
        if kv_cache.shape[2] != 1:
            raise ValueError(
                f"6-D cache must have L == 1 (slice one layer first), got shape {tuple(kv_cache.shape)}"
            )
        kv_cache = kv_cache.select(2, 0)
    if kv_cache.ndim != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"expected kv_cache [num_pages, 2, P, H, D], got {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's head_dim must be contiguous (stride 1)")
    return kv_cache


def _finish(run: Launch, warmup: bool) -> Launch:
    """Optionally run once and synchronize, so JIT builds, Triton compiles, lazy allocations and
    argument errors happen at setup, never inside a timed region or a graph capture."""
    if warmup:
        run()
        _torch().cuda.synchronize()
    return run


def _scale_tensor(scale: torch.Tensor | float | None, device: Any) -> torch.Tensor:
    """A float32 ``[1]`` device tensor (vLLM's per-tensor scale convention), default 1.0."""
    torch = _torch()
    if scale is None:
        scale = 1.0
    if isinstance(scale, (int, float)):
        return torch.tensor([float(scale)], dtype=torch.float32, device=device)
    return scale.to(device=device, dtype=torch.float32).reshape(-1)


def _scale_float(scale: torch.Tensor | float | None) -> float:
    """A host float (FlashInfer's wrappers fold scales into launch arguments on the host)."""
    if scale is None:
        return 1.0
    if isinstance(scale, (int, float)):
        return float(scale)
    if scale.numel() != 1:
        raise ValueError("FlashInfer takes one per-tensor scale; got a tensor with several values")
    return float(scale.reshape(-1)[0].item())


# --------------------------------------------------------------------------------------------
# store / append
# --------------------------------------------------------------------------------------------


def make_flashinfer_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    cache_lengths: torch.Tensor,
    new_lengths: Sequence[int],
    *,
    warmup: bool = True,
) -> Launch:
    """FlashInfer's paged append (``flashinfer.page.append_paged_kv_cache``, NHD).

    Args:
        k_new, v_new: ``[T, H, D]`` with ``T == sum(new_lengths)``, ragged by request in order.
        kv_cache: ``[num_pages, 2, P, H, D]`` (FlashInfer's combined NHD layout), or kvgen's
            ``[num_pages, 2, 1, P, H, D]``; pass a view of kvgen's blocks so both write the same
            storage. ``D`` must be 64, 128, 256 or 512.
        page_table: ``[B, cols]`` physical page ids per request (int32, or MAX's uint32 LUT).
            Must already cover the new tokens (FlashInfer requires the space to be allocated).
        cache_lengths: ``[B]`` tokens already cached per request (int32 / uint32, on device).
        new_lengths: new tokens per request (host ints).

    Setup (not timed): sequence lengths after the append, the CSR page table (``kv_indptr``,
    ``kv_indices``, ``kv_last_page_len``), the ragged ``append_indptr`` and, through
    ``flashinfer.page.get_batch_indices_positions(append_indptr, seq_lens, nnz)``, one
    ``(batch_index, position)`` per new token (position = ``cache_length + t``).

    FlashInfer's append does not convert dtypes (the kernel reinterprets the input as the cache
    dtype) and has no FP8 scaling, so for an FP8 cache ``k_new``/``v_new`` are cast once here
    (plain ``.to()``, unscaled) and the timed op is a pure scatter of cache-dtype bytes. That
    reads fewer bytes than a fused quantize-and-store; say so when comparing.

    Timed callable: ``append_paged_kv_cache(k, v, batch_indices, positions, kv_cache, kv_indices,
    kv_indptr, kv_last_page_len, kv_layout="NHD")`` -> one ``AppendPagedKVCacheKernel`` launch.
    """
    torch = _torch()
    flashinfer = _flashinfer()
    cache = _combined_nhd(kv_cache)
    page_size, num_heads, head_dim = cache.shape[2], cache.shape[3], cache.shape[4]
    if head_dim not in FLASHINFER_APPEND_HEAD_DIMS:
        raise ValueError(f"FlashInfer append supports head_dim {FLASHINFER_APPEND_HEAD_DIMS}, got {head_dim}")
    lengths = [int(n) for n in new_lengths]
    nnz = sum(lengths)
    if k_new.shape != (nnz, num_heads, head_dim) or v_new.shape != k_new.shape:
        raise ValueError(
            f"k_new/v_new must be [{nnz}, {num_heads}, {head_dim}], got {tuple(k_new.shape)} / {tuple(v_new.shape)}"
        )
    if len(lengths) != page_table.shape[0] or cache_lengths.shape[0] != page_table.shape[0]:
        raise ValueError("page_table, cache_lengths and new_lengths must agree on the batch size")
    device = cache.device
    k = k_new if k_new.dtype == cache.dtype else k_new.to(cache.dtype)
    v = v_new if v_new.dtype == cache.dtype else v_new.to(cache.dtype)

    new = torch.tensor(lengths, dtype=torch.int32, device=device)
    seq_lens = (_as_int32(cache_lengths).to(device) + new).contiguous()
    kv_indptr, kv_indices, kv_last_page_len = _csr_page_table(page_table.to(device), seq_lens, page_size)
    append_indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    append_indptr[1:] = torch.cumsum(new, 0).to(torch.int32)
    batch_indices, positions = flashinfer.page.get_batch_indices_positions(append_indptr, seq_lens, nnz)
    append = flashinfer.page.append_paged_kv_cache

    def run() -> None:
        append(
            k, v, batch_indices, positions, cache, kv_indices, kv_indptr, kv_last_page_len, kv_layout="NHD"
        )

    return _finish(run, warmup)


def make_vllm_reshape_and_cache(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    *,
    warmup: bool = True,
) -> Launch:
    """vLLM 0.24.0's Triton ``triton_reshape_and_cache_flash`` (the TRITON_ATTN backend's store).

    Args:
        k_new, v_new: ``[T, H, D]``; each token's ``H*D`` values must be contiguous.
        key_cache, value_cache: ``[num_blocks, P, H, D]`` (may be strided views, e.g.
            ``kv_cache[:, 0]`` / ``kv_cache[:, 1]`` of a combined or kvgen cache). The kernel
            addresses V with K's offsets, so both must have identical strides.
        slot_mapping: int64 ``[T]``, ``slot = page * P + offset``; negative slots are skipped.
        kv_cache_dtype: ``"auto"`` (store in the cache dtype) or ``"fp8"`` / ``"fp8_e4m3"``
            (quantize in the same pass: ``fp8 = x / scale``, cast on store; cache must be
            float8_e4m3fn or uint8).
        k_scale, v_scale: float32 device tensors ``[1]`` (read by the kernel, graph-safe).

    Grid ``(T, cdiv(H*D, TILE))`` with ``TILE = min(2048, next_pow2(H*D))``, 16 warps, 10 stages
    on CUDA. vLLM's own note: it matches the CUDA kernel only under CUDA graphs (Triton's Python
    launch overhead dominates eager timing of small appends).
    """
    torch = _torch()
    mod = _vllm_triton("vllm.v1.attention.ops.triton_reshape_and_cache_flash")
    if key_cache.ndim != 4 or key_cache.stride() != value_cache.stride():
        raise ValueError(
            "key_cache/value_cache must be 4-D [num_blocks, P, H, D] views with identical strides, got "
            f"{tuple(key_cache.shape)} {key_cache.stride()} / {tuple(value_cache.shape)} {value_cache.stride()}"
        )
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} must have contiguous [H, D] rows per token")
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    fn = mod.triton_reshape_and_cache_flash
    ks = _scale_tensor(k_scale, key_cache.device)
    vs = _scale_tensor(v_scale, key_cache.device)

    def run() -> None:
        fn(k_new, v_new, key_cache, value_cache, slot_mapping, kv_cache_dtype, ks, vs)

    return _finish(run, warmup)


def make_torch_index_copy(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache_rows_k: torch.Tensor,
    kv_cache_rows_v: torch.Tensor,
    slot_index: torch.Tensor,
    *,
    warmup: bool = True,
) -> Launch:
    """Naive baseline: two ``index_copy_`` scatters into row views of the cache.

    Args:
        k_new, v_new: ``[T, H, D]``.
        kv_cache_rows_k, kv_cache_rows_v: ``[rows, H, D]`` views of the cache's K and V rows
            (for kvgen's layout: the blocks flattened to rows, V offset by ``P`` rows, so that
            ``row(b, t) = LUT[b, t // P] * 2P + t % P`` indexes both).
        slot_index: int64 ``[T]`` destination rows.

    Inputs in another dtype than the cache are cast once here (``index_copy_`` needs equal
    dtypes), so the timed op is a pure scatter. One-byte (FP8) caches are scattered as uint8
    views, which copies the same bytes and does not depend on float8 kernels being compiled in.
    """
    torch = _torch()
    if slot_index.dtype != torch.int64:
        raise ValueError(f"slot_index must be int64, got {slot_index.dtype}")
    k = k_new if k_new.dtype == kv_cache_rows_k.dtype else k_new.to(kv_cache_rows_k.dtype)
    v = v_new if v_new.dtype == kv_cache_rows_v.dtype else v_new.to(kv_cache_rows_v.dtype)
    rows_k, rows_v = kv_cache_rows_k, kv_cache_rows_v
    if rows_k.element_size() == 1 and rows_k.dtype != torch.uint8:
        rows_k, k = rows_k.view(torch.uint8), k.view(torch.uint8)
    if rows_v.element_size() == 1 and rows_v.dtype != torch.uint8:
        rows_v, v = rows_v.view(torch.uint8), v.view(torch.uint8)

    def run() -> None:
        rows_k.index_copy_(0, slot_index, k)
        rows_v.index_copy_(0, slot_index, v)

    return _finish(run, warmup)


# --------------------------------------------------------------------------------------------
# decode attention
# --------------------------------------------------------------------------------------------


def make_flashinfer_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    use_tensor_cores: bool,
    kv_dtype: torch.dtype,
    *,
    use_cuda_graph: bool = True,
    sm_scale: float | None = None,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    enable_pdl: bool | None = None,
    warmup: bool = True,
) -> Launch:
    """FlashInfer ``BatchDecodeWithPagedKVCacheWrapper`` (plan once here, ``run`` when called).

    Args:
        q: ``[B, num_qo_heads, head_dim]`` bf16 (one query token per request).
        kv_cache: ``[num_pages, 2, P, H, D]`` NHD (or kvgen's 6-D with L == 1), bf16 or
            float8_e4m3fn; dtype must equal ``kv_dtype``.
        page_table: ``[B, cols]`` page ids (int32 or uint32); converted here to FlashInfer's CSR
            ``paged_kv_indptr / paged_kv_indices / paged_kv_last_page_len``.
        seq_lens: ``[B]`` context lengths including the current token.
        use_tensor_cores: False = CUDA-core decode kernel (GQA group must be 1, 2, 3, 4 or 8:
            ``DISPATCH_GQA_GROUP_SIZE`` in 0.6.12);
            True = the FA2 prefill (MMA) kernel with one query row per request (backend "fa2"
            for bf16 q, also with an fp8 cache since FA3 needs an fp8 query).
        use_cuda_graph: construct the wrapper in CUDA-graph mode with fixed index buffers, as
            serving engines do for captured decode; the plan then keeps a graph-replayable grid.
        k_scale, v_scale: per-tensor FP8 scales as host floats (FlashInfer folds ``k_scale`` into
            ``sm_scale``; a ``v_scale`` other than 1.0 adds an ``out *= v_scale`` kernel).
        enable_pdl: FlashInfer's default (None) turns PDL on for sm90.

    Output goes to a buffer allocated here; the callable is ``wrapper.run(q, kv_cache, out=...)``.
    """
    torch = _torch()
    flashinfer = _flashinfer()
    cache = _combined_nhd(kv_cache)
    if cache.dtype != kv_dtype:
        raise ValueError(f"kv_cache dtype {cache.dtype} != kv_dtype {kv_dtype}")
    if cache.shape[2:] != (page_size, num_kv_heads, head_dim) or q.shape[1:] != (num_qo_heads, head_dim):
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, kv_cache {tuple(cache.shape)} vs P={page_size} "
            f"Hq={num_qo_heads} Hkv={num_kv_heads} D={head_dim}"
        )
    device = q.device
    batch = q.shape[0]
    indptr, indices, last_page_len = _csr_page_table(page_table.to(device), seq_lens, page_size)
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    buffers: dict[str, Any] = {}
    if use_cuda_graph:
        buffers = {
            "paged_kv_indptr_buffer": torch.empty(batch + 1, dtype=torch.int32, device=device),
            "paged_kv_indices_buffer": torch.empty(max(1, indices.numel()), dtype=torch.int32, device=device),
            "paged_kv_last_page_len_buffer": torch.empty(batch, dtype=torch.int32, device=device),
        }
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        "NHD",
        use_cuda_graph=use_cuda_graph,
        use_tensor_cores=use_tensor_cores,
        **buffers,
    )
    wrapper.plan(
        indptr,
        indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        q_data_type=q.dtype,
        kv_data_type=kv_dtype,
        o_data_type=q.dtype,
        sm_scale=sm_scale,
    )
    out = torch.empty_like(q)
    ks = None if k_scale is None else _scale_float(k_scale)
    vs = None if v_scale is None else _scale_float(v_scale)

    def run() -> None:
        wrapper.run(q, cache, k_scale=ks, v_scale=vs, out=out, enable_pdl=enable_pdl)

    run.out = out  # type: ignore[attr-defined]  # result buffer, for correctness checks
    return _finish(run, warmup)


def make_flashinfer_xqa_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    enable_pdl: bool | None = None,
    warmup: bool = True,
) -> Launch:
    """FlashInfer's XQA decode (``flashinfer.decode.trtllm_batch_decode_with_kv_cache(...,
    backend="xqa")``), the kernel that ``backend="auto"`` picks on sm90 and vLLM uses there.

    Layouts (FlashInfer 0.6.12 ``decode.py`` / ``xqa.py``):
        q: ``[B, Hq, D]`` bf16 or fp16 (the op views it as ``[B, 1, Hq, D]``).
        kv_cache: ``[num_pages, 2, P, H, D]`` with ``kv_layout="NHD"`` (vLLM's layout; the op
            unbinds dim 1 into K and V views and passes page/token/head strides to the kernel),
            or kvgen's 6-D with L == 1. dtype bf16 (generic ``mha.cu`` kernel) or
            float8_e4m3fn (sm90 ``mha_sm90.cu`` path with one TMA descriptor over the pool).
            ``P`` must be 16, 32, 64 or 128; ``D % 16 == 0`` and ``D <= 256``.
        block_tables: int32 ``[B, max_pages]``, contiguous, K and V share it. XQA derives
            ``max_seq_len = block_tables.shape[1] * P`` from its width, so the adapter trims the
            table to ``ceil(max(seq_lens) / P)`` columns (kvgen's LUT is wider) and converts
            uint32 to int32 here.
        seq_lens: int32 ``[B]`` (read as uint32 by the kernel; the op views it as ``[B, 1]``).
        workspace: 128 MiB uint8, zero-filled: the first 8 MiB are XQA's semaphores (must start
            at zero), the rest is scratch for multi-block partials.

    Scales follow vLLM's FlashInfer backend: ``bmm1_scale = k_scale * sm_scale`` (sm_scale
    defaults to ``1/sqrt(D)``) and ``bmm2_scale = v_scale``, as host floats.

    Page size, head dim and GQA group are compile-time constants of the XQA module, so each new
    combination triggers a JIT build (see ``flashinfer_prebuild(xqa_page_sizes=...)``).
    """
    torch = _torch()
    flashinfer = _flashinfer()
    cache = _combined_nhd(kv_cache)
    page_size, head_dim = cache.shape[2], cache.shape[4]
    if page_size not in XQA_PAGE_SIZES:
        raise ValueError(f"XQA supports page sizes {XQA_PAGE_SIZES}, got {page_size}")
    if head_dim % 16 or not 16 <= head_dim <= 256:
        raise ValueError(f"XQA needs head_dim % 16 == 0 and <= 256, got {head_dim}")
    device = q.device
    lens = _as_int32(seq_lens).to(device).contiguous()
    max_len = int(lens.max().item())
    max_pages = max(1, -(-max_len // page_size))
    block_tables = _as_int32(page_table.to(device))[:, :max_pages].contiguous()
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    bmm1_scale = _scale_float(k_scale) * scale
    bmm2_scale = _scale_float(v_scale)
    out = torch.empty_like(q)
    decode = flashinfer.decode.trtllm_batch_decode_with_kv_cache

    def run() -> None:
        decode(
            query=q,
            kv_cache=cache,
            workspace_buffer=workspace,
            block_tables=block_tables,
            seq_lens=lens,
            max_seq_len=max_len,
            bmm1_scale=bmm1_scale,
            bmm2_scale=bmm2_scale,
            out=out,
            kv_layout="NHD",
            enable_pdl=enable_pdl,
            backend="xqa",
        )

    run.out = out  # type: ignore[attr-defined]
    return _finish(run, warmup)


def make_vllm_unified_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    sm_scale: float | None = None,
    seq_threshold_3d: int | None = None,
    warmup: bool = True,
) -> Launch:
    """vLLM 0.24.0's Triton ``unified_attention`` in decode-only form (one query per request).

    Args:
        q: ``[B, Hq, D]`` bf16/fp16; request b's query is row b (``cu_seqlens_q = arange(B+1)``).
        kv_cache: ``[num_blocks, 2, P, H, D]`` (vLLM's TRITON_ATTN layout) or kvgen's 6-D with
            L == 1; unbound here into strided K/V views ``[num_blocks, P, H, D]``.
        page_table: ``[B, cols]`` block ids (int32, or uint32 reinterpreted); any width.
        seq_lens: ``[B]`` context lengths (int32 on device, ``seqused_k``).
        kv_cache_dtype: ``"auto"`` (KVQuantMode.NONE) or ``"fp8"``/``"fp8_e4m3"``
            (FP8_PER_TENSOR: tiles are dequantized with ``k_scale``/``v_scale`` in the kernel).
        k_scale, v_scale: per-tensor scales, expanded to ``[B, H]`` descale views as vLLM does.
        seq_threshold_3d: batches up to this size use the 3-D split-KV kernel (16 segments) plus
            ``reduce_segments``; larger ones the 2-D kernel. Default ``128 // H`` as vLLM without
            CUDA graphs (with graphs vLLM rounds it to the nearest capture size). 0 forces 2-D.

    Causal, no sliding window, no soft-cap, no sinks, no alibi: the plain decode path. The
    segment buffers are allocated here, so the callable launches 1 or 2 Triton kernels.
    """
    torch = _torch()
    mod = _vllm_triton("vllm.v1.attention.ops.triton_unified_attention")
    kvi = _vllm_triton("vllm.v1.kv_cache_interface")
    cache = _combined_nhd(kv_cache)
    key_cache, value_cache = cache.unbind(1)
    if kv_cache_dtype.startswith("fp8") and key_cache.dtype == torch.uint8:
        key_cache = key_cache.view(torch.float8_e4m3fn)
        value_cache = value_cache.view(torch.float8_e4m3fn)
    device = q.device
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    lens = _as_int32(seq_lens).to(device).contiguous()
    max_len = int(lens.max().item())
    block_table = _as_int32(page_table.to(device)).contiguous()
    cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    k_descale = _scale_tensor(k_scale, device).expand(batch, num_kv_heads)
    v_descale = _scale_tensor(v_scale, device).expand(batch, num_kv_heads)
    threshold = VLLM_MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads if seq_threshold_3d is None else seq_threshold_3d
    segments = VLLM_NUM_PAR_SOFTMAX_SEGMENTS
    rows = max(1, threshold)
    padded = 1 << (head_dim - 1).bit_length()
    segm_output = torch.empty((rows, num_q_heads, segments, padded), dtype=torch.float32, device=device)
    segm_max = torch.empty((rows, num_q_heads, segments), dtype=torch.float32, device=device)
    segm_expsum = torch.empty((rows, num_q_heads, segments), dtype=torch.float32, device=device)
    out = torch.empty_like(q)
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    quant_mode = kvi.get_kv_quant_mode(kv_cache_dtype)
    attend = mod.unified_attention

    def run() -> None:
        attend(
            q=q,
            k=key_cache,
            v=value_cache,
            out=out,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=1,
            seqused_k=lens,
            max_seqlen_k=max_len,
            softmax_scale=scale,
            causal=True,
            window_size=(-1, -1),
            block_table=block_table,
            softcap=0,
            q_descale=None,
            k_descale=k_descale,
            v_descale=v_descale,
            seq_threshold_3D=threshold,
            num_par_softmax_segments=segments,
            softmax_segm_output=segm_output,
            softmax_segm_max=segm_max,
            softmax_segm_expsum=segm_expsum,
            kv_quant_mode=quant_mode,
        )

    run.out = out  # type: ignore[attr-defined]
    return _finish(run, warmup)


# --------------------------------------------------------------------------------------------
# FlashInfer ahead-of-time builds
# --------------------------------------------------------------------------------------------


def _set_flashinfer_env(arch_list: str, workspace_base: str | os.PathLike[str] | None) -> None:
    """FlashInfer reads its arch list and cache root once, at import; set them before that."""
    wanted = {"FLASHINFER_CUDA_ARCH_LIST": arch_list}
    if workspace_base is not None:
        wanted["FLASHINFER_WORKSPACE_BASE"] = str(Path(workspace_base).resolve())
    if "flashinfer" in sys.modules:
        stale = {k: v for k, v in wanted.items() if os.environ.get(k) != v}
        if stale:
            raise RuntimeError(
                f"flashinfer is already imported; {sorted(stale)} must be set before its import "
                "(call flashinfer_prebuild first, or export them in the environment)"
            )
    os.environ.update(wanted)


def flashinfer_prebuild(
    arch_list: str = "9.0a",
    *,
    head_dim: int = 128,
    kv_dtypes: Sequence[str] = ("bfloat16", "float8_e4m3fn"),
    q_dtype: str = "bfloat16",
    xqa_page_sizes: Sequence[int] = (16,),
    xqa_group_sizes: Sequence[int] = (),
    workspace_base: str | os.PathLike[str] | None = None,
    build: bool = True,
    verbose: bool = False,
) -> list[Path]:
    """Import FlashInfer and build ahead of time the JIT modules the adapters above use.

    Why: FlashInfer compiles each module with nvcc + ninja on first use (10-30 s per module),
    which must not land inside a benchmark. One call builds them all in a single ninja run
    (``flashinfer.jit.build_jit_specs``; ``MAX_JOBS`` caps parallelism), ~67 s on 16 cores for
    the default set. No GPU is needed: the arch list comes from ``arch_list``
    (``FLASHINFER_CUDA_ARCH_LIST``), so this also runs on a CPU machine with nvcc 13.0.

    Modules (q and output in ``q_dtype``, int32 indices, no RoPE / window / soft-cap):
      * ``page``: ``append_paged_kv_cache`` (dtype-generic);
      * ``batch_decode_with_kv_cache_*`` for each kv dtype (CUDA-core decode);
      * ``batch_prefill_with_kv_cache_*`` (fa2) for each kv dtype (tensor-core decode);
      * ``xqa_*`` for each kv dtype x page size x GQA group in ``xqa_group_sizes`` (XQA fixes
        page size and group at compile time; none are built unless groups are given).

    ``workspace_base`` relocates the cache (``FLASHINFER_WORKSPACE_BASE``; modules land in
    ``<base>/.cache/flashinfer/0.6.12/<archs>/cached_ops/<uri>/<uri>.so``). Both variables must
    be set before FlashInfer is first imported; a conflicting earlier import raises.
    ``build=False`` only renders the sources and writes each module's ``build.ninja``.

    Returns the paths of the module ``.so`` files (present when ``build`` is true).
    """
    _set_flashinfer_env(arch_list, workspace_base)
    torch = _torch()
    _flashinfer()
    try:
        from flashinfer.jit import build_jit_specs
        from flashinfer.jit.attention import gen_batch_decode_module, gen_batch_prefill_module
        from flashinfer.jit.page import gen_page_module
        from flashinfer.jit.xqa import gen_xqa_module
    except Exception as exc:
        raise PeerUnavailable(f"flashinfer.jit cannot be imported: {type(exc).__name__}: {exc}") from exc

    qd = getattr(torch, q_dtype)
    specs = [gen_page_module()]
    for name in kv_dtypes:
        kd = getattr(torch, name)
        # (dtype_q, dtype_kv, dtype_o, dtype_idx, head_dim_qk, head_dim_vo, pos_encoding_mode=NONE,
        #  use_sliding_window, use_logits_soft_cap): what BatchDecodeWithPagedKVCacheWrapper.plan asks for.
        specs.append(gen_batch_decode_module(qd, kd, qd, torch.int32, head_dim, head_dim, 0, False, False))
        # ... plus use_fp16_qk_reduction=False, for the use_tensor_cores=True path (backend "fa2").
        specs.append(
            gen_batch_prefill_module(
                "fa2", qd, kd, qd, torch.int32, head_dim, head_dim, 0, False, False, False
            )
        )
        for page_size in xqa_page_sizes:
            for group in xqa_group_sizes:
                # (input, kv, page_size, head_dim, head_group_ratio, use_sliding_window, output, q_seq_len)
                specs.append(gen_xqa_module(qd, kd, page_size, head_dim, group, False, qd, 1))
    if build:
        build_jit_specs(specs, verbose=verbose, skip_prebuilt=True)
    else:
        for spec in specs:
            spec.write_ninja()
    return [spec.get_library_path() for spec in specs]


def flashinfer_install_prebuilt(workspace_base: str | os.PathLike[str]) -> list[Path]:
    """Copy FlashInfer modules built elsewhere into the installed package's AOT folder.

    Why: a JIT cache is tied to absolute paths (its ``build.ninja`` names the site-packages it
    was generated from), so a cache built on another machine or venv is rebuilt by ninja. Modules
    found in ``<flashinfer>/data/aot/<uri>/<uri>.so`` are loaded directly instead (FlashInfer's
    ``JitSpec.is_aot``), with no ninja run. Copies every ``cached_ops/<uri>/<uri>.so`` under
    ``workspace_base`` (a ``FLASHINFER_WORKSPACE_BASE`` used by ``flashinfer_prebuild``, or any
    folder holding ``<uri>/<uri>.so``) and returns the installed paths. The install dir must be
    writable (e.g. a ``pip install --target`` site folder).
    """
    flashinfer = _flashinfer()
    aot_dir = Path(flashinfer.__file__).resolve().parent / "data" / "aot"
    try:
        from flashinfer.jit import env as jit_env

        aot_dir = Path(jit_env.FLASHINFER_AOT_DIR)
    except Exception:  # fall back to the package default computed above
        pass
    installed = []
    for so in sorted(Path(workspace_base).rglob("*.so")):
        if so.stem != so.parent.name:  # only <uri>/<uri>.so, not object files or stray libs
            continue
        target = aot_dir / so.stem / so.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, target)
        installed.append(target)
    return installed
