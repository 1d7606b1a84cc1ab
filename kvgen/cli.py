"""`kvgen` command line: build, list, show (and bench, on a GPU machine).

Exit codes: 0 success, 2 invalid config or arguments (message on stderr, nothing written), 1 compile failure,
3 `kvgen bench` without a CUDA GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import CompileError, ConfigError, Problem

EXIT_COMPILE = 1
EXIT_CONFIG = 2
EXIT_NO_GPU = 3


def _fail(err: Exception, code: int) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="kvgen")
def main() -> None:
    """Generate specialized CUDA KV-cache kernels from YAML configs."""


@main.command("build")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="output dir (default generated/<config>)")
@click.option("--arch", "archs", multiple=True, help="only these archs (repeatable), e.g. --arch sm_90a")
@click.option("--jobs", "-j", default=2, show_default=True, type=click.IntRange(1, 256), help="parallel compiles")
@click.option("--filter", "pattern", help="only variants whose name matches this glob or substring")
@click.option("--quiet", "-q", is_flag=True, help="no progress display")
def build_cmd(config: Path, out: Path | None, archs: tuple[str, ...], jobs: int, pattern: str | None, quiet: bool) -> None:
    """Expand CONFIG, render, compile with NVRTC and write an importable package."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .build import build, select
    from .grid import load_config

    try:
        cfg = load_config(config)
        chosen = select(cfg, pattern)
    except ConfigError as e:
        _fail(e, EXIT_CONFIG)
    total = sum(len([a for a in v.spec.archs if not archs or a in archs]) * (1 + len(v.spec.sources)) for v in chosen)
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]compiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, transient=True,
                        disable=quiet or not console.is_terminal)
    try:
        with progress:
            task = progress.add_task("", total=total)
            report = build(cfg, out=out, archs=list(archs) or None, jobs=jobs, pattern=pattern,
                           on_done=lambda label: progress.update(task, advance=1, description=label))
    except ConfigError as e:
        _fail(e, EXIT_CONFIG)
    except CompileError as e:
        _fail(e, EXIT_COMPILE)
    n_arch = sum(len(b.archs) for b in report.builds)
    hits = sum(a.cache_hit for b in report.builds for a in b.archs)
    click.echo(f"built {len(report.builds)} variant(s), {n_arch} cubin(s) ({hits} from cache) into {report.out_dir} "
               f"in {report.seconds:.2f} s; {len(report.written)} file(s) written, {report.unchanged} unchanged")


@main.command("list")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
def list_cmd(config: Path) -> None:
    """Print the variants CONFIG expands to: name, archs and kernels."""
    from .grid import load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(e, EXIT_CONFIG)
    for v in cfg.variants:
        click.echo(f"{v.name}\t{','.join(v.spec.archs)}\t{','.join(v.spec.effective_kernels)}")
    click.echo(f"{len(cfg.variants)} variant(s)", err=True)


@main.command("show")
@click.argument("variant")
@click.option("--config", "-c", "configs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="config file(s) to search (default: configs/*.yaml)")
@click.option("--arch", help="arch of the rendered source (default: the variant's first)")
@click.option("--trait", is_flag=True, help="print the standalone trait header instead of the kernels source")
def show_cmd(variant: str, configs: tuple[Path, ...], arch: str | None, trait: bool) -> None:
    """Print VARIANT's config and its rendered CUDA source (VARIANT: a full name or a unique part of one)."""
    from .grid import load_config
    from .render import render_source, render_trait_header

    paths = list(configs) or sorted(Path("configs").glob("*.yaml"))
    matches = []
    for p in paths:
        try:
            cfg = load_config(p)
        except ConfigError as e:
            _fail(e, EXIT_CONFIG)
        matches += [v for v in cfg.variants if v.name == variant or variant in v.name]
    exact = [v for v in matches if v.name == variant]
    matches = exact or matches
    if len(matches) != 1:
        names = ", ".join(v.name for v in matches[:10]) or "none"
        _fail(ConfigError([Problem("VARIANT", "must name exactly one variant", variant, f"matches: {names}")]), EXIT_CONFIG)
    v = matches[0]
    arch = arch or v.spec.archs[0]
    click.echo(f"# {v.name} (digest {v.digest})")
    click.echo(v.spec.model_dump_json(indent=2))
    click.echo(render_trait_header(v) if trait else render_source(v, arch))


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of one variant's config (for editors and YAML language servers); a config file
    may add `grid:` on top of these fields."""
    import json

    from .config import VariantSpec

    click.echo(json.dumps(VariantSpec.model_json_schema(), indent=2))


@main.command("bench")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="results dir (default bench-results/<config>)")
@click.option("--shape", "shapes", multiple=True, help="BATCHxCONTEXT, repeatable (default: {16,64,128} x {1k,4k,16k})")
@click.option("--no-skewed", is_flag=True, help="skip the 64-request log-normal batch")
@click.option("--jobs", "-j", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("--early-reads", is_flag=True,
              help="also time decode(early_cache_reads=True): cached K/V read before the previous kernel finishes")
def bench_cmd(config: Path, out: Path | None, shapes: tuple[str, ...], no_skewed: bool, jobs: int, early_reads: bool) -> None:
    """Benchmark CONFIG's decode kernels on the local GPU: prints a table, writes bench.md, bench.csv and
    bench.png. Exit 3 when no CUDA GPU (or PyTorch) is available. Peers: bench/decode_bench.py."""
    from .build import build, import_package
    from .grid import load_config

    try:
        cfg = load_config(config)
        parsed = [tuple(int(x) for x in s.lower().split("x")) for s in shapes]
        if any(len(p) != 2 or min(p) < 1 for p in parsed):
            raise ValueError
    except ConfigError as e:
        _fail(e, EXIT_CONFIG)
    except ValueError:
        _fail(ConfigError([Problem("--shape", "must be BATCHxCONTEXT with positive integers", shapes, "e.g. --shape 64x4096")]),
              EXIT_CONFIG)
    if not any(v.spec.attention is not None for v in cfg.variants):
        _fail(ConfigError([Problem("attention", "no variant of this config has attention parameters", None,
                                    "add attention: {num_q_heads: ...} to benchmark decode")]), EXIT_CONFIG)
    try:
        import torch
    except ImportError:
        click.echo("error: kvgen bench needs PyTorch with CUDA (pip install 'kvgen[torch]')", err=True)
        sys.exit(EXIT_NO_GPU)
    if not torch.cuda.is_available():
        click.echo("error: kvgen bench needs a CUDA GPU; none is visible", err=True)
        sys.exit(EXIT_NO_GPU)
    from . import benchmark

    try:
        report = build(cfg, out=Path("generated") / cfg.name, jobs=jobs)
    except CompileError as e:
        _fail(e, EXIT_COMPILE)
    module = import_package(report.out_dir, f"kvgen_bench_{cfg.name}")
    benchmark.run(module, out or Path("bench-results") / cfg.name, shapes=parsed or benchmark.DEFAULT_SHAPES,
                  skewed=not no_skewed, echo=click.echo, early_reads=early_reads)



if __name__ == "__main__":
    main()
