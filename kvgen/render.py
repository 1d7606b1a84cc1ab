"""Render one variant's CUDA source and standalone trait header from the Jinja templates."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jinja2

from .derive import render_context
from .grid import Variant

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"


def templates_dir() -> Path:
    """Installed wheels carry kvgen/templates; a source checkout keeps them at the top-level templates/."""
    for candidate in (PACKAGE_DIR / "templates", PACKAGE_DIR.parent / "templates"):
        if (candidate / "kernels.cu.j2").is_file():
            return candidate
    raise FileNotFoundError(f"kvgen templates not found next to {PACKAGE_DIR}")


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        autoescape=False,
    )


def render_source(variant: Variant, arch: str) -> str:
    """The .cu compiled for one arch (its kernel set depends on the arch: no TMA on sm_80)."""
    return environment().get_template("kernels.cu.j2").render(**render_context(variant, arch))


def render_trait_header(variant: Variant) -> str:
    """The standalone trait header users compile their own kernels against."""
    return environment().get_template("trait.cuh.j2").render(**render_context(variant, variant.spec.archs[0]))


def library_headers() -> dict[str, str]:
    """kvgen's own .cuh files, by include name ("kvgen/cache.cuh"), as the compiler sees them."""
    return {
        f"kvgen/{p.name}": p.read_text() for p in sorted((INCLUDE_DIR / "kvgen").glob("*.cuh"))
    }


@functools.cache
def generator_stamp() -> str:
    """What a generated package's kernels and the runtime that launches them must agree on: kvgen's headers (kernel
    code and argument layouts), the kernel template (entry-point signatures) and derive.py (the launch geometry,
    e.g. shared memory and the decode modes, that the runtime recomputes from the spec). Generated modules record
    it; KVCache refuses a package stamped by another kvgen instead of launching it with a mismatched geometry."""
    h = hashlib.sha256()
    for name, text in library_headers().items():
        h.update(f"{name}\n{text}\0".encode())
    h.update((templates_dir() / "kernels.cu.j2").read_bytes() + b"\0")
    h.update((PACKAGE_DIR / "derive.py").read_bytes())
    return h.hexdigest()[:16]
