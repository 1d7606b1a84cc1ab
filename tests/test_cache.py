"""The content-keyed compile cache: keys, hits, corruption, env switches, locking, cache dir."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import kvgen.cache as kc
from kvgen.cache import CompileForbidden, cache_dir, cache_key, compile_cached
from kvgen.nvrtc import CompileResult

SRC = 'extern "C" __global__ void k() {}\n'


class FakeCompiler:
    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, str]] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, source: str, arch: str) -> CompileResult:
        with self._lock:
            self.calls.append((source, arch))
            n = len(self.calls)
        if self.delay:
            time.sleep(self.delay)
        payload = f"{arch}|{source}|call{n}".encode()
        return CompileResult(cubin=b"\x7fELF" + payload, log="ptxas info", seconds=0.0, resources={})


@pytest.fixture
def fixed_toolchain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys that do not depend on the installed NVRTC (and do not need it)."""
    monkeypatch.setattr(kc, "toolchain_identity", lambda: "nvrtc=test")


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_key_is_deterministic(fixed_toolchain: None) -> None:
    assert cache_key(SRC, "sm_90a") == cache_key(SRC, "sm_90a")
    assert len(cache_key(SRC, "sm_90a")) == 64


def test_key_depends_on_source_and_arch(fixed_toolchain: None) -> None:
    k = cache_key(SRC, "sm_90a")
    assert cache_key(SRC + " ", "sm_90a") != k
    assert cache_key(SRC, "sm_100a") != k
    assert cache_key(SRC, "sm_80") != k


def test_key_depends_on_extra_defines(fixed_toolchain: None) -> None:
    """A/B builds of a header knob (nvrtc.defines) are cached apart from the default build, and the knob ends
    with the block."""
    from kvgen import nvrtc

    k = cache_key(SRC, "sm_90a")
    with nvrtc.defines("KVGEN_KV_PREFETCH=256"):
        assert "-DKVGEN_KV_PREFETCH=256" in nvrtc.nvrtc_options("sm_90a")
        assert cache_key(SRC, "sm_90a") != k
        with nvrtc.defines("KVGEN_DECODE_TRACE"):
            assert {"-DKVGEN_KV_PREFETCH=256", "-DKVGEN_DECODE_TRACE"} <= set(nvrtc.nvrtc_options("sm_90a"))
        # Leaving the inner block restores the outer set exactly.
        assert [o for o in nvrtc.nvrtc_options("sm_90a") if o.startswith("-D")] == ["-DKVGEN_KV_PREFETCH=256"]
    assert not [o for o in nvrtc.nvrtc_options("sm_90a") if o.startswith("-D")]
    assert cache_key(SRC, "sm_90a") == k
    with pytest.raises(RuntimeError), nvrtc.defines("KVGEN_KV_PREFETCH=64"):
        raise RuntimeError("a failed build")
    assert not [o for o in nvrtc.nvrtc_options("sm_90a") if o.startswith("-D")]


def test_key_depends_on_header_content(fixed_toolchain: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = kc.library_headers()
    assert "kvgen/cache.cuh" in real
    k = cache_key(SRC, "sm_90a")
    changed = dict(real)
    changed["kvgen/cache.cuh"] = real["kvgen/cache.cuh"] + "\n// one more line\n"
    monkeypatch.setattr(kc, "library_headers", lambda: changed)
    assert cache_key(SRC, "sm_90a") != k
    monkeypatch.setattr(kc, "library_headers", lambda: dict(real))
    assert cache_key(SRC, "sm_90a") == k


def test_key_depends_on_toolchain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kc, "toolchain_identity", lambda: "nvrtc=13.0|nvidia-cuda-cccl=13.0.85")
    a = cache_key(SRC, "sm_90a")
    monkeypatch.setattr(kc, "toolchain_identity", lambda: "nvrtc=13.0|nvidia-cuda-cccl=13.0.86")
    assert cache_key(SRC, "sm_90a") != a


def test_miss_then_hit(fixed_toolchain: None, isolated_cache: Path) -> None:
    fake = FakeCompiler()
    first = compile_cached(SRC, "sm_90a", compiler=fake)
    assert not first.hit and len(fake.calls) == 1
    second = compile_cached(SRC, "sm_90a", compiler=fake)
    assert second.hit and len(fake.calls) == 1
    assert second.result.cubin == first.result.cubin and second.key == first.key
    assert second.result.log == "ptxas info"
    assert (isolated_cache / first.key[:2] / f"{first.key}.cubin").read_bytes() == first.result.cubin
    # another arch is another entry
    third = compile_cached(SRC, "sm_100a", compiler=fake)
    assert not third.hit and len(fake.calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_meta", "garbage_meta"])
def test_corrupt_entry_is_rebuilt(fixed_toolchain: None, isolated_cache: Path, damage: str) -> None:
    fake = FakeCompiler()
    first = compile_cached(SRC, "sm_90a", compiler=fake)
    base = isolated_cache / first.key[:2] / first.key
    cubin, meta = base.with_suffix(".cubin"), base.with_suffix(".json")
    if damage == "truncate":
        cubin.write_bytes(cubin.read_bytes()[:6])
    elif damage == "flip":
        data = bytearray(cubin.read_bytes())
        data[-1] ^= 0xFF
        cubin.write_bytes(bytes(data))
    elif damage == "delete_meta":
        meta.unlink()
    else:
        meta.write_text("{not json")
    again = compile_cached(SRC, "sm_90a", compiler=fake)
    assert not again.hit and len(fake.calls) == 2
    assert cubin.read_bytes() == again.result.cubin  # the entry was rewritten whole
    assert compile_cached(SRC, "sm_90a", compiler=fake).hit and len(fake.calls) == 2


def test_no_cache_always_compiles(fixed_toolchain: None, isolated_cache: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCompiler()
    compile_cached(SRC, "sm_90a", compiler=fake)  # a valid entry exists...
    monkeypatch.setenv("KVGEN_NO_CACHE", "1")
    for i in range(3):
        r = compile_cached(SRC, "sm_90a", compiler=fake)
        assert not r.hit and len(fake.calls) == 2 + i  # ...and is ignored


def test_no_compile_with_empty_cache_is_forbidden(fixed_toolchain: None, isolated_cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCompiler()
    monkeypatch.setenv("KVGEN_NO_COMPILE", "1")
    with pytest.raises(CompileForbidden):
        compile_cached(SRC, "sm_90a", compiler=fake)
    assert fake.calls == []
    monkeypatch.setenv("KVGEN_NO_CACHE", "1")
    with pytest.raises(CompileForbidden):
        compile_cached(SRC, "sm_90a", compiler=fake)
    assert fake.calls == []


def test_no_compile_with_warm_cache_hits(fixed_toolchain: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCompiler()
    first = compile_cached(SRC, "sm_90a", compiler=fake)
    monkeypatch.setenv("KVGEN_NO_COMPILE", "1")
    r = compile_cached(SRC, "sm_90a", compiler=fake)
    assert r.hit and r.result.cubin == first.result.cubin and len(fake.calls) == 1


def test_concurrent_same_key_compiles_once(fixed_toolchain: None) -> None:
    fake = FakeCompiler(delay=0.5)
    results: list[bytes] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            results.append(compile_cached(SRC, "sm_90a", compiler=fake).result.cubin)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(fake.calls) == 1
    assert len(results) == 4 and len(set(results)) == 1


def test_no_temp_files_left(fixed_toolchain: None, isolated_cache: Path) -> None:
    fake = FakeCompiler()
    for arch in ("sm_80", "sm_90a", "sm_100a"):
        compile_cached(SRC, arch, compiler=fake)
        compile_cached(SRC, arch, compiler=fake)
    files = _entries(isolated_cache)
    assert not [p for p in files if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert sorted({p.suffix for p in files}) <= [".cubin", ".json", ".lock"]
    assert len([p for p in files if p.suffix == ".cubin"]) == 3


def test_failed_compile_writes_no_entry(fixed_toolchain: None, isolated_cache: Path) -> None:
    def broken(source: str, arch: str) -> CompileResult:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compile_cached(SRC, "sm_90a", compiler=broken)
    assert not [p for p in _entries(isolated_cache) if p.suffix in (".cubin", ".json", ".tmp")]
    fake = FakeCompiler()
    assert not compile_cached(SRC, "sm_90a", compiler=fake).hit


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVGEN_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("KVGEN_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "kvgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvgen"


def test_entries_land_in_kvgen_cache_dir(fixed_toolchain: None, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    monkeypatch.setenv("KVGEN_CACHE_DIR", str(target))
    r = compile_cached(SRC, "sm_90a", compiler=FakeCompiler())
    assert (target / r.key[:2] / f"{r.key}.cubin").is_file()
