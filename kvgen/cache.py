"""Content-keyed disk cache of compiled cubins.

The key hashes everything the compiler sees (rendered source, kvgen's headers, options, NVRTC and header
versions, arch, schema), never names or mtimes. Entries are written atomically (temp file + os.replace);
a per-key file lock keeps two builders from compiling the same thing twice, and a checksum in the entry's
metadata catches truncated or corrupt cubins, which are then rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .nvrtc import CompileResult, compile_cubin, key_options, toolchain_identity
from .render import library_headers

CACHE_SCHEMA = 1


class CompileForbidden(RuntimeError):
    """KVGEN_NO_COMPILE is set and the cubin is not cached."""


def cache_dir() -> Path:
    if os.environ.get("KVGEN_CACHE_DIR"):
        return Path(os.environ["KVGEN_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "kvgen"
    return Path.home() / ".cache" / "kvgen"


def cache_enabled() -> bool:
    return os.environ.get("KVGEN_NO_CACHE", "") in ("", "0")


def compile_allowed() -> bool:
    return os.environ.get("KVGEN_NO_COMPILE", "") in ("", "0")


def cache_key(source: str, arch: str) -> str:
    h = hashlib.sha256()
    for part in (
        f"schema={CACHE_SCHEMA}",
        f"arch={arch}",
        "opts=" + " ".join(key_options(arch)),
        "toolchain=" + toolchain_identity(),
        *(f"header {name}\n{text}" for name, text in library_headers().items()),
        "source\n" + source,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class CachedCompile:
    result: CompileResult
    key: str
    hit: bool


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_entry(base: Path) -> CompileResult | None:
    """A valid entry, or None when missing, truncated or corrupt (the caller rebuilds it)."""
    meta_path, cubin_path = base.with_suffix(".json"), base.with_suffix(".cubin")
    try:
        meta = json.loads(meta_path.read_text())
        cubin = cubin_path.read_bytes()
    except (OSError, ValueError):
        return None
    if not cubin.startswith(b"\x7fELF") or hashlib.sha256(cubin).hexdigest() != meta.get("sha256"):
        return None
    return CompileResult(cubin=cubin, log=meta.get("log", ""), seconds=float(meta.get("seconds", 0.0)),
                         resources=meta.get("resources", {}))


def compile_cached(source: str, arch: str, compiler: Callable[[str, str], CompileResult] = compile_cubin) -> CachedCompile:
    key = cache_key(source, arch)
    if not cache_enabled():
        if not compile_allowed():
            raise CompileForbidden(f"KVGEN_NO_COMPILE is set and KVGEN_NO_CACHE disables the cache ({arch})")
        return CachedCompile(compiler(source, arch), key, hit=False)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    base = root / key[:2] / key
    base.parent.mkdir(exist_ok=True)
    found = _read_entry(base)
    if found is not None:
        return CachedCompile(found, key, hit=True)
    with FileLock(str(base.with_suffix(".lock"))):
        found = _read_entry(base)  # another builder may have finished while we waited
        if found is not None:
            return CachedCompile(found, key, hit=True)
        if not compile_allowed():
            raise CompileForbidden(f"KVGEN_NO_COMPILE is set and no cached cubin exists for key {key[:16]} ({arch})")
        result = compiler(source, arch)
        _atomic_write(base.with_suffix(".cubin"), result.cubin)
        meta = {"sha256": hashlib.sha256(result.cubin).hexdigest(), "arch": arch, "log": result.log,
                "seconds": result.seconds, "resources": result.resources}
        _atomic_write(base.with_suffix(".json"), json.dumps(meta).encode())  # written last: the commit marker
    return CachedCompile(result, key, hit=False)
