"""The host-side KV cache of one generated variant: tensors, lookup table, lengths, and kernel launches.

Allocation uses PyTorch; `KVCache.wrap` adopts tensors the caller already has (PyTorch, or CuPy /
__cuda_array_interface__ objects for the blocks). Launches run on the caller's current stream, allocate
nothing and never synchronize, so they can be captured in CUDA graphs. Every launch validates its
arguments first; the kernels additionally skip (and flag in `error_word`) any write the host could not
prove safe, so a bad page table can never write outside the cache.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import numpy as np

from ..derive import (
    DECODE_TILE,
    THREADS,
    StoreSplit,
    decode_geometry,
    store_split,
    tma_geometry,
    tokens_per_block,
)
from ..dtypes import DTYPES
from ..errors import LaunchError
from ..reference import padded_lut_cols
from . import driver
from .abi import ERROR_NAMES, CacheArgs
from .decode_plan import DecodePlan, DecodeWorkspace, plan_decode, workspace_pairs
from .tensors import DeviceTensor, check_positive_float32, check_tensor, to_host

if TYPE_CHECKING:
    from .tma import TmaTile
    from .variant import GeneratedVariant

_U32 = ("uint32", "int32")


def _torch() -> Any:
    import torch

    return torch


def _torch_dtype(name: str) -> Any:
    torch = _torch()
    return {"uint32": torch.int32, "float8_e8m0fnu": torch.uint8}.get(name) or getattr(torch, name)


MAX_FIXED_SPLITS = 1024
"""Largest split count plan_decode(splits=...) accepts (a 64-row split each covers 64 Ki rows)."""


class _Launch:
    """Pre-packed kernel parameters: values are updated in place, so a launch allocates nothing."""

    def __init__(self, kernel: driver.Kernel, *fields: Any):
        self.kernel = kernel
        self.fields = fields
        self.params, self._keep = driver.pack(*fields)

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], stream: int) -> None:
        self.kernel.launch(grid, block, self.params, stream)

    def dependent(self, grid: tuple[int, int, int], block: tuple[int, int, int], stream: int) -> None:
        """Programmatic dependent launch (see driver.Kernel.launch_dependent)."""
        self.kernel.launch_dependent(grid, block, self.params, stream)


class KVCache:
    """A KV-cache collection (all layers, K and V) of one variant, plus its page table and lengths."""

    def __init__(self, variant: type[GeneratedVariant], blocks: Any, scales: Any | None, lookup_table: Any,
                 cache_lengths: Any, *, num_layers: int, device: int, tokens_per_slot: int = 0, max_tokens: int = 8192):
        self.variant = variant
        self.spec = variant.spec()
        c = self.spec.cache
        self.paged = c.kind == "paged"
        self.kv_dim = c.kv_dim
        self.num_heads, self.head_size = c.num_kv_heads, c.head_size
        self.page_size = c.page_size if self.paged else None
        self.page_rows = c.page_size if self.paged else tokens_per_slot  # rows per page (or slot) in one view
        self.num_layers = num_layers
        self.device = device
        self.dtype = c.dtype
        self.io_dtype = c.io_dtype
        self.quantized = self.spec.quantization is not None
        self.groups = (c.head_size + self.spec.quantization.granularity - 1) // self.spec.quantization.granularity if self.quantized else 0

        blk = check_tensor("KVCache", "blocks", blocks, dtype=self.dtype, device=None)
        if len(blk.shape) != 6 or blk.shape[1:] != (self.kv_dim, num_layers, self.page_rows, self.num_heads, self.head_size):
            raise LaunchError("KVCache", "blocks", "shape must be [num_blocks, KVD, L, P, H, D] of this variant",
                              list(blk.shape), f"allocate [n, {self.kv_dim}, {num_layers}, {self.page_rows}, {self.num_heads}, {self.head_size}]")
        self.device = blk.device
        self.num_blocks = blk.shape[0]
        self.blocks, self.blocks_ptr = blocks, blk.ptr
        self.scales = scales
        scales_ptr = 0
        if self.quantized:
            if scales is None:
                raise LaunchError("KVCache", "scales", "a quantized variant needs a scales tensor", None,
                                  "allocate [num_blocks, KVD, L, P, H, G]")
            sd = "uint8" if self.spec.quantization.scale_dtype == "float8_e8m0fnu" else "float32"
            sc = check_tensor("KVCache", "scales", scales, dtype=(sd, self.spec.quantization.scale_dtype),
                              shape=(self.num_blocks, self.kv_dim, num_layers, self.page_rows, self.num_heads, self.groups),
                              device=self.device, align=4)
            scales_ptr = sc.ptr
        lut = check_tensor("KVCache", "lookup_table", lookup_table, dtype=_U32, device=self.device)
        self.max_batch = lut.shape[0]
        self.lut_cols = lut.shape[1] if self.paged else 1
        if self.paged:
            if len(lut.shape) != 2 or self.lut_cols % 8 or self.lut_cols < 16:
                raise LaunchError("KVCache", "lookup_table", "needs round_up(pages, 8) + 16 columns (populate reads ahead)",
                                  list(lut.shape), "build it with kvgen.reference.padded_lut_cols(max_pages)")
        lens = check_tensor("KVCache", "cache_lengths", cache_lengths, dtype=_U32, shape=(self.max_batch,), device=self.device, align=4)
        self.lookup_table, self.cache_lengths = lookup_table, cache_lengths
        torch = _torch()
        self.error_word = torch.zeros(1, dtype=torch.int32, device=f"cuda:{self.device}")
        self._row_offsets = torch.zeros(self.max_batch + 1, dtype=torch.int32, device=f"cuda:{self.device}")
        # Per new token (page or slot, offset in it), resolved by begin_step from the host mirror of the lookup
        # table: the store kernel reads one 8-byte entry per token (re-checked on the device) instead of a CSR
        # binary search and a page-table load, two dependent loads ncu showed the store waiting on.
        # Sized for max_tokens new tokens per step and never reallocated, so a captured graph keeps a valid
        # pointer. A step with more new tokens stores through the CSR search instead (begin_step decides).
        self._token_map = torch.zeros(2 * max_tokens, dtype=torch.int32, device=f"cuda:{self.device}")
        self._step_has_map = False
        self._raw_stream = torch._C._cuda_getCurrentRawStream
        self.host_lut = np.full((self.max_batch, self.lut_cols), self.null_page, np.uint32) if self.paged \
            else np.zeros(self.max_batch, np.uint32)
        self.host_lengths = np.zeros(self.max_batch, np.uint32)
        self.step_lengths: np.ndarray | None = None
        self.args = CacheArgs(
            blocks=blk.ptr, scales=scales_ptr, cache_lengths=lens.ptr, lookup_table=lut.ptr,
            error_word=self.error_word.data_ptr(), batch_size=self.max_batch, lut_row_stride=self.lut_cols,
            num_blocks=self.num_blocks, num_layers=num_layers, max_seq_length=0, max_cache_length=0,
            tokens_per_slot=tokens_per_slot, reserved=0)
        self._split: StoreSplit = store_split(self.spec)
        self._tpb = 8 if self.spec.rope_layout else tokens_per_block(self.spec, self._split)
        self._launches: dict[str, _Launch] = {}
        self._scalars = {k: ctypes.c_uint32(0) for k in ("total", "layer", "tpb", "kv", "tiles", "n")}
        self._ptrs = {k: ctypes.c_uint64(0) for k in ("a", "b", "c", "d")}
        self._u64 = {k: ctypes.c_uint64(0) for k in ("page_bytes", "scale_bytes")}
        self._dec_vals = {"layer": ctypes.c_uint32(0), "q": ctypes.c_uint64(0), "po": ctypes.c_uint64(0),
                          "pl": ctypes.c_uint64(0), "chunk": ctypes.c_uint32(0), "scale": ctypes.c_float(0),
                          "cap": ctypes.c_float(1), "window": ctypes.c_uint32(0), "splits": ctypes.c_uint32(0),
                          "sinks": ctypes.c_uint64(0), "out": ctypes.c_uint64(0), "lse": ctypes.c_uint64(0),
                          "hq": ctypes.c_uint32(0),
                          # the decode kernel's own final-output pointers (set only for single-split plans)
                          "fout": ctypes.c_uint64(0), "flse": ctypes.c_uint64(0), "fsinks": ctypes.c_uint64(0)}
        self._window: int | None = None
        self.decode_plan: DecodePlan | None = None
        self._decode_ws: DecodeWorkspace | None = None
        self._retired_ws: list[DecodeWorkspace] = []  # outgrown workspaces: captured graphs may still write them
        # Geometry of the decode kernel for this GPU's arch (shared memory, loader), fixed per variant: computed
        # once, not on every launch.
        arch = driver.device_arch(self.device)
        self._decode_geo = decode_geometry(self.spec, arch) if self.spec.attention is not None else None
        self._decode_smem = self._decode_geo.smem_bytes if self._decode_geo is not None else 0
        self._decode_maps: dict[int, tuple[TmaTile, TmaTile]] = {}  # layer -> K, V create_tma_tile descriptors
        # Programmatic dependent launch (griddepcontrol) exists from sm_90 on.
        self._pdl = int("".join(ch for ch in arch if ch.isdigit())) >= 90
        self.tma_geometry = tma_geometry(self.spec)  # box and tile shape of create_tma_tile / tile_load, per variant

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def allocate(cls, variant: type[GeneratedVariant], *, max_batch: int, num_pages: int | None = None,
                 max_pages_per_request: int | None = None, num_slots: int | None = None,
                 tokens_per_slot: int | None = None, num_layers: int | None = None, device: int = 0,
                 fill: float | None = None, max_tokens: int = 8192) -> KVCache:
        """Allocate blocks (+ null page), scales, lookup table (all null page) and zero cache lengths."""
        torch = _torch()
        spec = variant.spec()
        c = spec.cache
        L = num_layers or c.num_layers
        dev = f"cuda:{device}"
        if c.kind == "paged":
            if not num_pages or not max_pages_per_request:
                raise LaunchError("KVCache.allocate", "num_pages", "a paged cache needs num_pages and max_pages_per_request",
                                  (num_pages, max_pages_per_request), "pass both, e.g. num_pages=1024, max_pages_per_request=64")
            nb, rows, cols = num_pages + 1, c.page_size, padded_lut_cols(max_pages_per_request)
            lut = torch.full((max_batch, cols), num_pages, dtype=torch.int32, device=dev)
            slot_len = 0
        else:
            if not num_slots or not tokens_per_slot:
                raise LaunchError("KVCache.allocate", "num_slots", "a continuous cache needs num_slots and tokens_per_slot",
                                  (num_slots, tokens_per_slot), "pass both, e.g. num_slots=max_batch, tokens_per_slot=4096")
            nb, rows, slot_len = num_slots, tokens_per_slot, tokens_per_slot
            lut = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        shape = (nb, c.kv_dim, L, rows, c.num_kv_heads, c.head_size)
        blocks = torch.empty(shape, dtype=_torch_dtype(c.dtype), device=dev)
        if fill is not None:
            blocks.view(torch.uint8).zero_() if fill == 0 else blocks.copy_(torch.full(shape, fill, device=dev).to(blocks.dtype))
        scales = None
        if spec.quantization is not None:
            g = (c.head_size + spec.quantization.granularity - 1) // spec.quantization.granularity
            sdt = torch.uint8 if spec.quantization.scale_dtype == "float8_e8m0fnu" else torch.float32
            scales = torch.ones((nb, c.kv_dim, L, rows, c.num_kv_heads, g), dtype=sdt, device=dev)
        lengths = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        cache = cls(variant, blocks, scales, lut, lengths, num_layers=L, device=device, tokens_per_slot=slot_len,
                    max_tokens=max_tokens)
        if c.kind == "continuous":
            cache.host_lut[:] = np.arange(max_batch, dtype=np.uint32) % nb
            cache.lookup_table.copy_(torch.from_numpy(cache.host_lut.astype(np.int32)))
        return cache

    @classmethod
    def wrap(cls, variant: type[GeneratedVariant], blocks: Any, scales: Any | None, lookup_table: Any,
             cache_lengths: Any, *, num_layers: int, tokens_per_slot: int = 0, max_tokens: int = 8192) -> KVCache:
        """Adopt tensors the caller already owns (same layout as allocate); nothing is copied on the device.
        The host mirror of the page table and lengths (capacity checks, the step's token map) is read back once."""
        cache = cls(variant, blocks, scales, lookup_table, cache_lengths, num_layers=num_layers, device=0,
                    tokens_per_slot=tokens_per_slot, max_tokens=max_tokens)
        cache.host_lut = to_host(lookup_table).view(np.uint32).reshape(cache.host_lut.shape).copy()
        cache.host_lengths = to_host(cache_lengths).view(np.uint32).copy()
        return cache

    # ---- host-side trait members ----------------------------------------------------------------------
    @property
    def null_page(self) -> int:
        return self.num_blocks - 1

    @property
    def stride(self) -> int:
        return self.kv_dim * self.num_layers * self.page_rows

    def get_type_name(self) -> str:
        return f"{'PagedKVCache' if self.paged else 'ContinuousKVCache'}<{self.variant.NAME}>"

    def cache_lengths_nd(self) -> Any:
        return self.cache_lengths

    def cache_length(self, b: int) -> int:
        return int(self.host_lengths[b])

    def max_prompt_length(self) -> int:
        return int(self.args.max_seq_length)

    def max_context_length(self) -> int:
        return int(self.args.max_cache_length)

    def empty_cache(self) -> bool:
        return self.args.max_cache_length == 0

    def max_tile_size(self) -> int:
        return self.page_size if self.paged else -1

    def num_kv_rows(self) -> int:
        return (self.num_blocks - 1) * self.stride + self.page_rows

    def row_idx(self, b: int, t: int) -> int:
        if not self.paged:
            return int(self.host_lut[b]) * self.stride + t
        return int(self.host_lut[b, t // self.page_size]) * self.stride + t % self.page_size

    def get_tma_row(self, enc: int) -> int:
        return enc if not self.paged else (enc // self.page_size) * self.stride + enc % self.page_size

    def copy(self) -> KVCache:
        """A shallow copy sharing the tensors (MAX's copy of the trait object), with its own step state."""
        other = object.__new__(KVCache)
        other.__dict__.update(self.__dict__)
        other.args = CacheArgs.from_buffer_copy(self.args)
        other._launches = {}
        return other

    def view(self, kv: int, layer: int) -> Any:
        """The [num_blocks, P, H, D] torch view of one (K|V, layer) slice (page stride KVD*L*P*H*D)."""
        return self.blocks[:, kv, layer]

    # ---- page table and lengths (host mirror + device copy; call outside graph capture) ----------------
    def set_pages(self, pages: list[list[int]]) -> None:
        """Assign physical pages per request; unassigned entries stay the null page."""
        if not self.paged:
            raise LaunchError("set_pages", "pages", "a continuous cache has slots, not pages", None, "use set_slots")
        if len(pages) > self.max_batch:
            raise LaunchError("set_pages", "pages", f"at most max_batch={self.max_batch} requests", len(pages), "allocate a larger max_batch")
        lut = np.full((self.max_batch, self.lut_cols), self.null_page, np.uint32)
        for b, ids in enumerate(pages):
            ids = np.asarray(ids, dtype=np.int64)
            if len(ids) > self.lut_cols - 16:
                raise LaunchError("set_pages", f"pages[{b}]", f"at most {self.lut_cols - 16} pages per request",
                                  len(ids), "allocate with a larger max_pages_per_request")
            if len(ids) and (ids.min() < 0 or ids.max() >= self.null_page):
                raise LaunchError("set_pages", f"pages[{b}]", f"page ids must be in [0, {self.null_page})",
                                  int(ids.max() if len(ids) and ids.max() >= self.null_page else ids.min()),
                                  "use ids of allocated pages (the last page is the null page)")
            lut[b, : len(ids)] = ids
        self.host_lut = lut
        self.lookup_table.copy_(_torch().from_numpy(lut.view(np.int32)))
        self._drop_step_plan()

    def set_slots(self, slots: list[int]) -> None:
        if self.paged:
            raise LaunchError("set_slots", "slots", "a paged cache has pages, not slots", None, "use set_pages")
        s = np.zeros(self.max_batch, np.uint32)
        s[: len(slots)] = slots
        if len(slots) and (min(slots) < 0 or max(slots) >= self.num_blocks):
            raise LaunchError("set_slots", "slots", f"slot ids must be in [0, {self.num_blocks})", slots, "use allocated slots")
        self.host_lut = s
        self.lookup_table.copy_(_torch().from_numpy(s.view(np.int32)))
        self._drop_step_plan()

    def set_cache_lengths(self, lengths: list[int]) -> None:
        n = np.zeros(self.max_batch, np.uint32)
        n[: len(lengths)] = lengths
        self.host_lengths = n
        self.cache_lengths.copy_(_torch().from_numpy(n.view(np.int32)))
        self._drop_step_plan()

    def _drop_step_plan(self) -> None:
        """The step's token map holds pages resolved from the page table and lengths at begin_step; after either
        changes it could point at a page another request now owns, so the next store must plan again."""
        self.step_lengths = None

    def capacity(self, b: int) -> int:
        """Tokens request b can hold: its assigned pages (leading non-null LUT entries) times P, or a slot."""
        if not self.paged:
            return self.page_rows
        row = self.host_lut[b]
        unassigned = np.nonzero(row == self.null_page)[0]
        return int(unassigned[0] if len(unassigned) else len(row)) * self.page_size

    def begin_step(self, new_lengths: list[int]) -> Any:
        """Plan one step (reused by every layer): check capacity on the host, upload CSR row offsets and the
        per-token (page, offset) map, set max_prompt_length / max_context_length. Call it after the step's
        set_pages / set_cache_lengths: changing either drops the plan. Returns the device row-offsets tensor."""
        n = len(new_lengths)
        if n > self.max_batch:
            raise LaunchError("begin_step", "new_lengths", f"at most max_batch={self.max_batch} requests", n, "allocate more")
        for b, k in enumerate(new_lengths):
            need = int(self.host_lengths[b]) + int(k)
            if k < 0 or need > self.capacity(b):
                raise LaunchError("begin_step", f"new_lengths[{b}]",
                                  f"cache_length {int(self.host_lengths[b])} + {k} new tokens exceeds the {self.capacity(b)} "
                                  "tokens of the pages assigned to this request", k, "assign more pages with set_pages first")
        offs = np.zeros(self.max_batch + 1, np.int32)
        offs[1: n + 1] = np.cumsum(new_lengths)
        offs[n + 1:] = offs[n]
        torch = _torch()
        self._row_offsets.copy_(torch.from_numpy(offs))
        total = int(offs[n])
        # A bigger step (a long prefill chunk) leaves the map alone rather than reallocating it: a graph captured
        # for decode steps holds its address, and a replay after a reallocation read freed memory.
        self._step_has_map = 2 * total <= self._token_map.numel()
        if total and self._step_has_map:
            req = np.repeat(np.arange(n, dtype=np.int64), np.asarray(new_lengths, dtype=np.int64))
            pos = self.host_lengths[req].astype(np.int64) + (np.arange(total) - offs[req])
            if self.paged:
                page, off = self.host_lut[req, pos // self.page_size].astype(np.int64), pos % self.page_size
            else:
                page, off = self.host_lut[req].astype(np.int64), pos
            self._token_map[: 2 * total].copy_(torch.from_numpy(np.stack([page, off], axis=1).astype(np.uint32).view(np.int32).ravel()))
        self.args.batch_size = n
        self.args.max_seq_length = max(new_lengths, default=0)
        self.args.max_cache_length = int(max((self.host_lengths[b] + k for b, k in enumerate(new_lengths)), default=0))
        self.step_lengths = np.asarray(new_lengths, np.uint32)
        return self._row_offsets[: n + 1]

    def end_step(self) -> None:
        """Advance cache_lengths by the step's new tokens (host mirror and device)."""
        if self.step_lengths is None:
            return
        lengths = self.host_lengths.copy()
        lengths[: len(self.step_lengths)] += self.step_lengths
        self.set_cache_lengths(list(lengths))  # also drops the step's plan

    # ---- errors flagged by kernels --------------------------------------------------------------------
    def errors(self) -> list[str]:
        """Decode the device error word (synchronizes). Empty when every launch was clean."""
        w = int(self.error_word.item())
        return [msg for bit, msg in ERROR_NAMES.items() if w & bit]

    def raise_if_error(self) -> None:
        errs = self.errors()
        if errs:
            self.error_word.zero_()
            raise RuntimeError("kvgen kernels refused some accesses: " + "; ".join(errs))

    # ---- launches -------------------------------------------------------------------------------------
    def _kernel(self, name: str, smem: int = 0) -> driver.Kernel:
        arch = driver.device_arch(self.device)
        if arch not in self.variant.CUBINS:
            raise LaunchError(self.variant.NAME, "device", "no cubin for this GPU's arch", arch,
                              f"add {arch} to archs and rebuild (have: {', '.join(self.variant.CUBINS)})")
        symbols = self.variant.KERNELS[arch]
        if name not in symbols:
            raise LaunchError(self.variant.NAME, "kernel", f"kernel {name!r} was not emitted for {arch}", name,
                              "add it to the config's kernels and rebuild")
        return driver.load_module(self.variant.CUBINS[arch], self.device).kernel(symbols[name], smem)

    def _launch(self, key: str, name: str, fields: tuple[Any, ...], smem: int = 0) -> _Launch:
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = _Launch(self._kernel(name, smem), *fields)
        return launch

    def _stream(self, stream: Any) -> int:
        if stream is None:
            return self._raw_stream(self.device)  # torch's current stream (the capture stream inside a graph)
        if isinstance(stream, int):
            return stream
        return int(getattr(stream, "cuda_stream", None) or getattr(stream, "ptr", None) or stream.handle)

    def _row_offsets_arg(self, kernel: str, row_offsets: Any, total: int) -> DeviceTensor:
        if row_offsets is None:
            if self.step_lengths is None:
                raise LaunchError(kernel, "row_offsets",
                                  "needs begin_step(new_lengths) first (again after set_pages / set_slots / "
                                  "set_cache_lengths) or explicit CSR offsets", None,
                                  "call cache.begin_step([...]) once per step, after the page table is final")
            if int(self.step_lengths.sum()) != total:
                raise LaunchError(kernel, "k", f"has {total} rows but the step plans {int(self.step_lengths.sum())}",
                                  total, "pass tensors with sum(new_lengths) rows")
            row_offsets = self._row_offsets
        return check_tensor(kernel, "row_offsets", row_offsets, dtype=_U32, device=self.device, align=4)

    def _check_layer(self, kernel: str, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise LaunchError(kernel, "layer", f"must be in [0, {self.num_layers})", layer, "pass a layer of this cache")

    def _kv_rows(self, kernel: str, names: tuple[str, str], k: Any, v: Any | None) -> tuple[DeviceTensor, int]:
        """The K rows tensor checked, and the V pointer (V = K for an MLA cache, which has no separate V)."""
        kt = check_tensor(kernel, names[0], k, dtype=self.io_dtype, shape=self._io_shape(), device=self.device)
        if self.kv_dim == 1:
            return kt, kt.ptr
        if v is None:
            raise LaunchError(kernel, names[1], f"an MHA cache moves K and V together; {names[0]} came alone", None,
                              f"pass {names[1]}")
        return kt, check_tensor(kernel, names[1], v, dtype=self.io_dtype, shape=kt.shape, device=self.device).ptr

    def _io_shape(self) -> tuple[int | None, ...]:
        if self.spec.rope_layout:
            r = self.spec.rope_layout
            return (None, r.padded_depth + r.rope_dim)
        return (None, self.num_heads, self.head_size)

    def _ragged_inputs(self, kernel: str, layer: int, names: tuple[str, str], k: Any, v: Any | None,
                       row_offsets: Any) -> tuple[DeviceTensor, int, DeviceTensor]:
        """Checks shared by store and load: layer, the K/V row tensors, the CSR row offsets (explicit offsets
        also set the batch size). Returns (K rows, V pointer, row offsets)."""
        self._check_layer(kernel, layer)
        kt, vptr = self._kv_rows(kernel, names, k, v)
        ro = self._row_offsets_arg(kernel, row_offsets, kt.shape[0])
        if row_offsets is not None:
            self.args.batch_size = ro.shape[0] - 1
        return kt, vptr, ro

    def _launch_ragged(self, kernel: str, layer: int, total: int, k: int, v: int, offsets: int, extra: int,
                       stream: Any) -> None:
        """store / load launch: one block per tokens_per_block new tokens (they share the argument layout)."""
        p, s = self._ptrs, self._scalars
        launch = self._launch(kernel, kernel, (self.args, p["a"], p["b"], p["c"], p["d"], s["total"], s["layer"], s["tpb"]))
        p["a"].value, p["b"].value, p["c"].value, p["d"].value = k, v, offsets, extra
        s["total"].value, s["layer"].value, s["tpb"].value = total, layer, self._tpb
        launch(((total + self._tpb - 1) // self._tpb, 1, 1), (THREADS, 1, 1), self._stream(stream))

    def store(self, layer: int, k: Any, v: Any | None = None, row_offsets: Any = None, stream: Any = None) -> None:
        """Write new K/V rows [T, H, D] at cache_length(b) + t (CSR row offsets; default: the step's)."""
        kt, vptr, ro = self._ragged_inputs("store", layer, ("k", "v"), k, v, row_offsets)
        total = kt.shape[0]
        if total == 0:
            return
        token_map = self._token_map.data_ptr() if row_offsets is None and self._step_has_map else 0
        self._launch_ragged("store", layer, total, kt.ptr, vptr, ro.ptr, token_map, stream)

    def load(self, layer: int, k_out: Any, v_out: Any | None, start_pos: Any, row_offsets: Any = None,
             stream: Any = None) -> None:
        """Read rows [start_pos(b), start_pos(b) + n_b) of every request into k_out/v_out [T, H, D], dequantized."""
        kn = "load"
        kt, vptr, ro = self._ragged_inputs(kn, layer, ("k_out", "v_out"), k_out, v_out, row_offsets)
        total = kt.shape[0]
        sp = check_tensor(kn, "start_pos", start_pos, dtype=_U32, shape=(None,), device=self.device, align=4)
        if sp.shape[0] < self.args.batch_size:
            raise LaunchError(kn, "start_pos", f"needs one entry per request ({self.args.batch_size})", sp.shape[0],
                              "pass a start position for every request")
        if total == 0:
            return
        self._launch_ragged("load", layer, total, kt.ptr, vptr, ro.ptr, sp.ptr, stream)

    @property
    def page_bytes(self) -> int:
        return self.kv_dim * self.num_layers * self.page_rows * self.num_heads * self.head_size * DTYPES[self.dtype].nbytes

    @property
    def scale_page_bytes(self) -> int:
        if not self.quantized:
            return 0
        sb = 1 if self.spec.quantization.scale_dtype == "float8_e8m0fnu" else 4
        return self.kv_dim * self.num_layers * self.page_rows * self.num_heads * self.groups * sb

    def copy_pages(self, src_ids: Any, dst_ids: Any, stream: Any = None) -> None:
        """Copy whole pages (all layers, K and V, scales): src_ids[i] -> dst_ids[i] (uint32/int32 device tensors).
        Ids past the allocation, and any write to the null page, are refused in the kernel (see errors())."""
        kn = "copy_pages"
        st = check_tensor(kn, "src_ids", src_ids, dtype=_U32, shape=(None,), device=self.device, align=4)
        dt = check_tensor(kn, "dst_ids", dst_ids, dtype=_U32, shape=st.shape, device=self.device, align=4)
        n = st.shape[0]
        if n == 0:
            return
        p, s, u = self._ptrs, self._scalars, self._u64
        launch = self._launch("copy", "copy_pages", (self.args, p["a"], p["b"], s["n"], u["page_bytes"], u["scale_bytes"]))
        p["a"].value, p["b"].value, s["n"].value = st.ptr, dt.ptr, n
        u["page_bytes"].value, u["scale_bytes"].value = self.page_bytes, self.scale_page_bytes
        chunks = max(1, min(32, (self.page_bytes // 16 + THREADS - 1) // THREADS))
        launch((chunks, n, 1), (THREADS, 1, 1), self._stream(stream))

    # ---- decode attention -----------------------------------------------------------------------------
    def plan_decode(self, window: int | None = None, splits: int | None = None) -> DecodePlan:
        """Plan the step's decode (call after begin_step, once per step, outside graph capture). window: the
        sliding window in tokens (variants generated with sliding_window), None for full attention. splits: fix
        the split count instead of letting the planner choose it; the kernel then cuts each request's context
        into that many equal parts from the lengths on the device, so a decode captured once in a CUDA graph
        (same grid every step) stays balanced as the contexts grow."""
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise LaunchError("plan_decode", "window", "must be a positive number of tokens, or None for no window",
                              window, "pass e.g. window=4096, or window=None")
        if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int)
                                   or not 1 <= splits <= MAX_FIXED_SPLITS):
            raise LaunchError("plan_decode", "splits", f"must be an int in [1, {MAX_FIXED_SPLITS}]", splits,
                              "pass e.g. splits=4, or splits=None to let the planner choose")
        self._window = window
        self.decode_plan = plan_decode(self, splits=splits)
        return self.decode_plan

    def decode_workspace(self, pairs: int) -> DecodeWorkspace:
        """The split-K workspace every plan of this cache writes, with room for at least `pairs` (request, split)
        pairs. It only grows (doubling), and a replaced workspace stays allocated as long as the cache, so CUDA
        graphs captured with an earlier plan keep writing memory of their own."""
        ws = self._decode_ws
        if ws is None:
            slots = driver.resident_blocks(self._kernel("decode", self._decode_smem), 128, self.device)
            ws = self._decode_ws = DecodeWorkspace(self, max(pairs, workspace_pairs(self.max_batch, self.num_heads, slots)))
        elif pairs > ws.pairs:
            self._retired_ws.append(ws)
            ws = self._decode_ws = DecodeWorkspace(self, max(pairs, 2 * ws.pairs))
        return ws

    def decode(self, layer: int, q: Any, out: Any, *, softmax_scale: float | None = None, window: int | None = None,
               soft_cap: float | None = None, sinks: Any = None, lse: Any = None, stream: Any = None) -> None:
        """One query token per request: out[b, hq] = softmax(q[b, hq] . K^T * scale) V over the request's
        cache_length(b) + 1 cached tokens (store the step's token first). q, out: [batch, Hq, D].
        softmax_scale: default head_size ** -0.5. window / soft_cap / sinks: only for variants generated with
        them; None turns each off (full context, no cap, no sink), so one variant serves both kinds of layer."""
        kn = "decode"
        att = self.spec.attention
        if att is None:
            raise LaunchError(kn, "variant", "this variant has no attention parameters", self.variant.NAME,
                              "add attention: {num_q_heads: ...} and decode to the config")
        self._check_layer(kn, layer)
        plan = self.decode_plan
        if plan is None or plan.batch != self.args.batch_size:
            raise LaunchError(kn, "plan", "plan_decode() must run once per step, after begin_step", None,
                              "call cache.plan_decode() before the layers")
        B, Hq, D = int(self.args.batch_size), att.num_q_heads, self.head_size
        qt = check_tensor(kn, "q", q, dtype=self.io_dtype, shape=(B, Hq, D), device=self.device)
        ot = check_tensor(kn, "out", out, dtype=att.output_dtype, shape=(B, Hq, D), device=self.device)
        if window is not None and not att.sliding_window:
            raise LaunchError(kn, "window", "the variant was generated without a sliding window", window,
                              "set attention.sliding_window: true")
        if soft_cap is not None and not att.logits_soft_cap:
            raise LaunchError(kn, "soft_cap", "the variant was generated without a logits soft cap", soft_cap,
                              "set attention.logits_soft_cap: true")
        cap = 0.0 if soft_cap is None else check_positive_float32(  # 0: no cap (the kernel branches on it)
            kn, "soft_cap", soft_cap, "pass e.g. soft_cap=30.0 (Gemma 2), or soft_cap=None for no cap")
        scale = D ** -0.5 if softmax_scale is None else check_positive_float32(
            kn, "softmax_scale", softmax_scale, "pass e.g. head_size ** -0.5, or None for that default")
        if att.sliding_window and window != self._window:
            raise LaunchError(kn, "window", "must match the window given to plan_decode", window, "re-plan")
        sink_ptr = 0
        if sinks is not None:
            if not att.sinks:
                raise LaunchError(kn, "sinks", "the variant was generated without sinks", "tensor", "set attention.sinks: true")
            sink_ptr = check_tensor(kn, "sinks", sinks, dtype="float32", shape=(Hq,), device=self.device, align=4).ptr
        lse_ptr = 0 if lse is None else check_tensor(kn, "lse", lse, dtype="float32", shape=(B, Hq), device=self.device, align=4).ptr
        if B == 0:
            return
        st = self._stream(stream)
        f = self._dec_vals
        fields = (self.args, f["layer"], f["q"], f["po"], f["pl"], f["chunk"], f["scale"], f["cap"], f["window"],
                  f["fout"], f["flse"], f["fsinks"])
        if self._decode_geo.tma:
            kmap, vmap = self._decode_tile_maps(layer)
            launch = self._launch("decode", "decode", (kmap.param_address, vmap.param_address, *fields), smem=self._decode_smem)
            launch.params[0], launch.params[1] = kmap.param_address, vmap.param_address
        else:
            launch = self._launch("decode", "decode", fields, smem=self._decode_smem)
        f["layer"].value, f["q"].value, f["po"].value, f["pl"].value = layer, qt.ptr, plan.part_o.data_ptr(), plan.part_lse.data_ptr()
        f["chunk"].value = plan.chunk
        f["scale"].value, f["cap"].value = scale, cap
        # No window on a window-capable variant: the largest uint32, which no context exceeds (0 would mean a
        # window of no tokens and silently produce zeros).
        f["window"].value = window if window is not None else 0xFFFFFFFF
        # A single-split plan (every request fits one chunk, e.g. batch >= 64 at a few thousand tokens) has
        # nothing to merge: the decode kernel writes the final output itself and the combine launch is skipped.
        single = plan.splits == 1
        f["fout"].value, f["flse"].value, f["fsinks"].value = (ot.ptr, lse_ptr, sink_ptr) if single else (0, 0, 0)
        launch((plan.splits, self.num_heads, B), (128, 1, 1), st)
        if single:
            return
        comb = self._launch("combine", "decode_combine", (f["po"], f["pl"], f["splits"], f["sinks"], f["out"], f["lse"], f["hq"]))
        f["splits"].value, f["sinks"].value, f["out"].value, f["lse"].value, f["hq"].value = (
            plan.splits, sink_ptr, ot.ptr, lse_ptr, Hq)
        # The combine launches as a programmatic dependent of the decode kernel (sm_90+), which signals it after
        # its tile loop: its launch and CTA start overlap the decode's epilogues instead of following them.
        (comb.dependent if self._pdl else comb)((Hq, B, 1), (min(256, D), 1, 1), st)

    def _decode_tile_maps(self, layer: int) -> tuple[TmaTile, TmaTile]:
        """The K and V descriptors (decode_padded_tile) the TMA decode reads a layer through. Encoded once per
        layer; the cache keeps them alive, and a captured graph holds its own copy of the kernel parameters."""
        maps = self._decode_maps.get(layer)
        if maps is None:
            from .tma import decode_padded_tile

            maps = self._decode_maps[layer] = (decode_padded_tile(self, 0, layer, DECODE_TILE),
                                               decode_padded_tile(self, 1, layer, DECODE_TILE))
        return maps

    # ---- TMA ------------------------------------------------------------------------------------------
    def create_tma_tile(self, kv: int, layer: int, swizzle: str | None = None, bn: int | None = None,
                        bk: int | None = None) -> TmaTile:
        from .tma import create_tma_tile

        return create_tma_tile(self, kv, layer, swizzle, bn, bk)

    def create_ragged_tma_tile(self, kv: int, layer: int, swizzle: str, bm: int, bk: int) -> TmaTile:
        from .tma import create_ragged_tma_tile

        return create_ragged_tma_tile(self, kv, layer, swizzle, bm, bk)

    def create_rope_tma_tile(self, layer: int, bn: int, bk: int = 64) -> TmaTile:
        from .tma import create_rope_tma_tile

        return create_rope_tma_tile(self, layer, bn, bk)

    def create_gather4_tma_tile(self, kv: int, layer: int, tile_width: int, **kw: Any) -> TmaTile:
        from .tma import create_gather4_tma_tile

        return create_gather4_tma_tile(self, kv, layer, tile_width, **kw)

    def create_rope_gather4_tma_tile(self, layer: int, **kw: Any) -> TmaTile:
        from .tma import create_rope_gather4_tma_tile

        return create_rope_gather4_tma_tile(self, layer, **kw)

    def tile_load(self, tile: TmaTile, layer: int, kv: int, out: Any, stream: Any = None) -> None:
        """Load every BN tile of every request (cache_length rows each) through `tile` (from create_tma_tile
        of the same kv and layer) into out [batch, max_tiles, H, BN, BK] in the cache dtype."""
        kn = "tma_tile_load"
        geo = self.tma_geometry
        ot = check_tensor(kn, "out", out, dtype=self.dtype, shape=(self.args.batch_size, None, self.num_heads, geo.bn, geo.bk),
                          device=self.device)
        if tile.kind != "create_tma_tile" or tile.box[-1] != geo.gran or tile.swizzle != geo.swizzle:
            raise LaunchError(kn, "tile", "must come from create_tma_tile with this variant's swizzle and BN", tile.kind,
                              "use cache.create_tma_tile(kv, layer)")
        self._check_layer(kn, layer)
        max_tiles = ot.shape[1]
        if self.args.batch_size == 0 or max_tiles == 0:
            return
        p, s = self._ptrs, self._scalars
        launch = self._launch("tile", "tma_tile_load", (tile.param_address, self.args, s["layer"], s["kv"], p["a"], s["tiles"]),
                              smem=geo.smem_bytes)
        launch.params[0] = tile.param_address
        self._current_tile = tile  # keeps the descriptor bytes alive while the launch is queued
        s["layer"].value, s["kv"].value, s["tiles"].value, p["a"].value = layer, kv, max_tiles, ot.ptr
        launch((max_tiles, self.num_heads, self.args.batch_size), (128, 1, 1), self._stream(stream))
