"""Build a config: expand, render, compile (in parallel, through the cache), then write generated/<config>/.

Everything is compiled in memory first; files are written only when every variant compiled, each one
atomically and only when its bytes changed, so a failed build leaves no half-written package and a
rebuild with nothing changed rewrites nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .cache import _atomic_write, compile_cached
from .derive import kernel_symbol
from .errors import CompileError, ConfigError, Problem
from .grid import ConfigFile, Variant, load_config
from .nvrtc import NvrtcFailure
from .render import environment, generator_stamp, library_headers, render_source, render_trait_header


@dataclass
class ArchBuild:
    arch: str
    source: str
    cubin: bytes
    seconds: float
    cache_hit: bool
    resources: dict[str, dict[str, int]]
    kernels: dict[str, str]


@dataclass
class VariantBuild:
    variant: Variant
    archs: list[ArchBuild] = field(default_factory=list)
    user: dict[str, ArchBuild] = field(default_factory=dict)  # "<stem>.<arch>" -> build


@dataclass
class BuildReport:
    config: ConfigFile
    out_dir: Path
    builds: list[VariantBuild]
    written: list[Path]
    unchanged: int
    seconds: float


def select(config: ConfigFile, pattern: str | None) -> list[Variant]:
    if not pattern:
        return list(config.variants)
    chosen = [v for v in config.variants if fnmatch.fnmatch(v.name, pattern) or pattern in v.name]
    if not chosen:
        raise ConfigError([Problem("--filter", "matches no variant", pattern, "run `kvgen list CONFIG` to see the names")])
    return chosen


def _user_source(variant: Variant, config_dir: Path, rel: str) -> tuple[str, str]:
    path = (config_dir / rel).resolve()
    try:
        text = path.read_text()
    except OSError:
        raise ConfigError([Problem("sources", "user kernel source cannot be read", rel,
                                   "give a path relative to the config file")]) from None
    header = render_trait_header(variant)
    return path.stem, f"{header}\n#line 1 \"{path.name}\"\n{text}"


def compile_all(config: ConfigFile, variants: list[Variant], archs: list[str] | None, jobs: int,
                on_done: Callable[[str], None] | None = None) -> list[VariantBuild]:
    """Compile every (variant, arch) and user source; raise CompileError for the first failure."""
    config_dir = config.path.parent if config.path else Path.cwd()
    tasks: list[tuple[VariantBuild, str, str, str | None]] = []  # (build, arch, source, user stem)
    builds = []
    for v in variants:
        vb = VariantBuild(v)
        builds.append(vb)
        for arch in v.spec.archs:
            if archs and arch not in archs:
                continue
            tasks.append((vb, arch, render_source(v, arch), None))
            for rel in v.spec.sources:
                stem, src = _user_source(v, config_dir, rel)
                tasks.append((vb, arch, src, stem))

    def run(task: tuple[VariantBuild, str, str, str | None]) -> tuple[VariantBuild, str, str, str | None, object]:
        vb, arch, src, stem = task
        try:
            return (*task, compile_cached(src, arch))
        except NvrtcFailure as e:
            return (*task, e)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for vb, arch, src, stem, res in pool.map(run, tasks):
            label = f"{vb.variant.name} {arch}" + (f" ({stem})" if stem else "")
            if isinstance(res, NvrtcFailure):
                saved = _save_failed_source(vb.variant.name, arch, src)
                raise CompileError(vb.variant.name, arch, res.log, str(saved))
            kernels = {k: kernel_symbol(vb.variant, k) for k in vb.variant.spec.kernels_for_arch(arch)} if stem is None else {}
            ab = ArchBuild(arch, src, res.result.cubin, res.result.seconds, res.hit, res.result.resources, kernels)
            if stem is None:
                vb.archs.append(ab)
            else:
                vb.user[f"{stem}.{arch}"] = ab
            if on_done:
                on_done(label)
    return builds


def _save_failed_source(name: str, arch: str, source: str) -> Path:
    d = Path(os.environ.get("KVGEN_FAILED_DIR", Path.cwd() / ".kvgen-failed"))
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.{arch}.cu"
    p.write_text(source)
    return p


def package_files(config: ConfigFile, builds: list[VariantBuild]) -> dict[str, bytes]:
    """Every file of generated/<config>/, by relative path."""
    files: dict[str, bytes] = {}
    for name, text in library_headers().items():
        files[f"include/{name}"] = text.encode()
    module_variants = []
    manifest = {"config": config.name, "schema": 1, "variants": []}
    for vb in builds:
        v = vb.variant
        trait = f"{v.name}.cuh"
        files[trait] = render_trait_header(v).encode()
        cubins, sources, user = {}, {}, {}
        entry = {"name": v.name, "digest": v.digest, "config": json.loads(v.config_json), "archs": []}
        for ab in vb.archs:
            cubins[ab.arch] = f"{v.name}.{ab.arch}.cubin"
            sources[ab.arch] = f"{v.name}.{ab.arch}.cu"
            files[cubins[ab.arch]] = ab.cubin
            files[sources[ab.arch]] = ab.source.encode()
            entry["archs"].append({
                "arch": ab.arch, "cubin": cubins[ab.arch], "sha256": hashlib.sha256(ab.cubin).hexdigest(),
                "compile_seconds": round(ab.seconds, 4), "kernels": ab.kernels, "resources": ab.resources,
            })
        for key, ab in vb.user.items():
            user[key] = f"{v.name}.{key}.cubin"
            files[user[key]] = ab.cubin
            files[f"{v.name}.{key}.cu"] = ab.source.encode()
            entry["archs"].append({"arch": ab.arch, "user_source": key, "cubin": user[key],
                                   "sha256": hashlib.sha256(ab.cubin).hexdigest(), "compile_seconds": round(ab.seconds, 4)})
        manifest["variants"].append(entry)
        module_variants.append({
            "name": v.name, "digest": v.digest, "config_json": v.config_json, "archs": [ab.arch for ab in vb.archs],
            "kernels": {ab.arch: ab.kernels for ab in vb.archs}, "cubins": cubins, "sources": sources,
            "user_cubins": user, "trait_header": trait,
        })
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    files["__init__.py"] = environment().get_template("module.py.j2").render(
        config_name=config.name, config_path=str(config.path or ""), variants=module_variants,
        generator=generator_stamp()).encode()
    return files


def write_package(out_dir: Path, files: dict[str, bytes]) -> tuple[list[Path], int]:
    """Write changed files atomically; remove files of an earlier build that this one no longer has."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, unchanged = [], 0
    for rel, data in sorted(files.items()):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if path.read_bytes() == data:
                unchanged += 1
                continue
        except OSError:
            pass
        _atomic_write(path, data)
        written.append(path)
    keep = {out_dir / rel for rel in files}
    for path in sorted(out_dir.rglob("*"), reverse=True):
        if path.is_file() and path not in keep and "__pycache__" not in path.parts:
            path.unlink()
        elif path.is_dir() and path.name != "__pycache__" and not any(path.iterdir()):
            path.rmdir()
    return written, unchanged


def import_package(out_dir: str | Path, module_name: str | None = None):  # noqa: ANN201 - a module object
    """Import a generated package from its folder (no sys.path changes); needs no GPU."""
    import importlib.util
    import sys

    out_dir = Path(out_dir)
    name = module_name or f"kvgen_generated_{out_dir.name}"
    spec = importlib.util.spec_from_file_location(name, out_dir / "__init__.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no generated package at {out_dir} (run kvgen build first)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(config: ConfigFile | str | Path, out: str | Path | None = None, archs: list[str] | None = None,
          jobs: int = 2, pattern: str | None = None, on_done: Callable[[str], None] | None = None) -> BuildReport:
    """Python API of `kvgen build`: returns what was built and written."""
    t0 = time.perf_counter()
    if not isinstance(config, ConfigFile):
        config = load_config(config)
    variants = select(config, pattern)
    builds = compile_all(config, variants, archs, jobs, on_done)
    out_dir = Path(out) if out else Path("generated") / config.name
    written, unchanged = write_package(out_dir, package_files(config, builds))
    return BuildReport(config, out_dir, builds, written, unchanged, time.perf_counter() - t0)
