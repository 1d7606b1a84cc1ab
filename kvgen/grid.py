"""Load a config file and expand its `grid` into validated variants with stable, readable names.

A config is one variant's fields plus an optional `grid`: a mapping (one block) or a list of mappings
(a union of blocks). Each block maps dotted field paths to lists of values; a block expands to the
cartesian product of its lists, applied on top of the base fields.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import VariantSpec, validate_variant
from .dtypes import DTYPES
from .errors import ConfigError, Problem

NAME_SCHEMA = 1  # bump when the digest's input changes shape


@dataclass(frozen=True)
class Variant:
    spec: VariantSpec
    digest: str  # 8 hex of sha256 over the canonical JSON of the whole spec
    name: str  # readable, symbol-safe, unique per config

    @property
    def config_json(self) -> str:
        return canonical_json(self.spec)


@dataclass(frozen=True)
class ConfigFile:
    path: Path | None
    name: str
    variants: list[Variant]


# Fields added after NAME_SCHEMA 1, left out of the digest while they hold their default: a variant that does not
# use them keeps its name (and the class name users import) across kvgen versions.
_LATER_FIELDS = {"cache": {"static_scales": False}}


def canonical_json(spec: VariantSpec) -> str:
    data = spec.model_dump(mode="json")
    for section, fields in _LATER_FIELDS.items():
        for name, default in fields.items():
            if data[section].get(name) == default:
                del data[section][name]
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def variant_digest(spec: VariantSpec) -> str:
    return hashlib.sha256(f"{NAME_SCHEMA}|{canonical_json(spec)}".encode()).hexdigest()[:8]


def variant_name(spec: VariantSpec, digest: str) -> str:
    c = spec.cache
    parts = [spec.name, "paged" if c.kind == "paged" else "cont", DTYPES[c.dtype].short,
             f"h{c.num_kv_heads}", f"d{c.head_size}"]
    if c.is_mla:
        parts.append("mla")
    if c.page_size:
        parts.append(f"p{c.page_size}")
    if spec.quantization:
        parts.append(f"q{DTYPES[spec.quantization.scale_dtype].short}g{spec.quantization.granularity}")
    if c.static_scales:
        parts.append("ss")  # static (per tensor / per head) scales
    if spec.rope_layout:
        parts.append(f"rope{spec.rope_layout.rope_dim}")
    parts.append(f"s{spec.tma.swizzle.lower()}")
    if spec.attention is not None and spec.attention.loader != "auto":
        parts.append({"tma": "ldtma", "cp_async": "ldcpa"}[spec.attention.loader])
    parts.append(digest)
    return "_".join(parts)


def make_variant(spec: VariantSpec) -> Variant:
    digest = variant_digest(spec)
    return Variant(spec=spec, digest=digest, name=variant_name(spec, digest))


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([Problem(f"grid.{dotted}", "path goes through a non-mapping field", nxt,
                                       "grid keys are dotted paths of mapping fields, e.g. cache.dtype")])
        cur = nxt
    cur[keys[-1]] = copy.deepcopy(value)


def _grid_blocks(grid: Any) -> list[dict[str, list[Any]]]:
    blocks = grid if isinstance(grid, list) else [grid]
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or not b:
            raise ConfigError([Problem(f"grid[{i}]", "each grid block is a non-empty mapping of path -> list", b,
                                       "write e.g. grid: {cache.dtype: [bfloat16, float16]}")])
        for k, vals in b.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError([Problem(f"grid[{i}].{k}", "grid values must be a non-empty list", vals,
                                           f"write {k}: [value1, value2]")])
        out.append(b)
    return out


def expand(data: dict[str, Any], source: str | None = None) -> list[Variant]:
    """Expand a parsed config into variants. Any invalid grid point rejects the whole config."""
    if not isinstance(data, dict):
        raise ConfigError([Problem("<config>", "the top level must be a mapping", type(data).__name__,
                                   "start the file with fields such as name:, cache:")], source)
    base = {k: v for k, v in data.items() if k != "grid"}
    points: list[tuple[str, dict[str, Any]]] = []
    if data.get("grid") is None:
        points.append(("", base))
    else:
        try:
            blocks = _grid_blocks(data["grid"])
        except ConfigError as e:
            raise ConfigError(e.problems, source) from None
        for bi, block in enumerate(blocks):
            keys = list(block)
            for combo in itertools.product(*(block[k] for k in keys)):
                d = copy.deepcopy(base)
                try:
                    for k, val in zip(keys, combo):
                        _set_dotted(d, k, val)
                except ConfigError as e:
                    raise ConfigError(e.problems, source) from None
                label = f"grid[{bi}] " + ", ".join(f"{k}={json.dumps(val)}" for k, val in zip(keys, combo))
                points.append((label, d))
    variants: list[Variant] = []
    seen: dict[str, str] = {}
    for label, d in points:
        try:
            spec = validate_variant(d)
        except ConfigError as e:
            where = f"{source or '<config>'}" + (f" at {label}" if label else "")
            raise ConfigError(e.problems, where) from None
        v = make_variant(spec)
        if v.name in seen:
            continue  # two grid blocks naming the same point build it once
        seen[v.name] = label
        variants.append(v)
    return variants


def load_config(path: str | Path) -> ConfigFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([Problem("<file>", "config file cannot be read", str(path), f"check the path ({e.strerror})")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([Problem("<file>", "not valid YAML", str(e).splitlines()[0], "fix the YAML syntax")], str(path)) from None
    variants = expand(data, str(path))
    name = path.stem.replace("-", "_")
    return ConfigFile(path=path, name=name, variants=variants)
