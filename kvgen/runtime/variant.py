"""Base class of the per-variant classes in generated packages."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, ClassVar

from ..config import VariantSpec


class GeneratedVariant:
    NAME: ClassVar[str]
    DIGEST: ClassVar[str]
    GENERATOR: ClassVar[str] = ""  # kvgen.render.generator_stamp() of the kvgen that built the package
    CONFIG_JSON: ClassVar[str]
    ARCHS: ClassVar[list[str]]
    KERNELS: ClassVar[dict[str, dict[str, str]]]
    CUBINS: ClassVar[dict[str, Path]]
    SOURCES: ClassVar[dict[str, Path]]
    USER_CUBINS: ClassVar[dict[str, Path]]
    TRAIT_HEADER: ClassVar[Path]
    INCLUDE_DIR: ClassVar[Path]

    @classmethod
    @functools.cache
    def spec(cls) -> VariantSpec:
        return VariantSpec.model_validate(json.loads(cls.CONFIG_JSON))

    @classmethod
    def source(cls, arch: str) -> str:
        return cls.SOURCES[arch].read_text()

    @classmethod
    def cubin(cls, arch: str) -> bytes:
        return cls.CUBINS[arch].read_bytes()

    @classmethod
    def cache(cls, **kwargs: Any):  # noqa: ANN206 - returns kvgen.runtime.kvcache.KVCache
        """Allocate (or wrap) a KV cache of this variant on the current CUDA device."""
        from .kvcache import KVCache

        return KVCache.allocate(cls, **kwargs)
