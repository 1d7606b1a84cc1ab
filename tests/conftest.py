"""Shared fixtures for kvgen's CPU tests."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_BASE: dict[str, Any] = {
    "name": "t",
    "cache": {
        "kind": "paged",
        "dtype": "bfloat16",
        "num_kv_heads": 8,
        "head_size": 128,
        "page_size": 128,
    },
    "archs": ["sm_90a"],
}


def base_config() -> dict[str, Any]:
    """A valid variant dict (paged bf16, 8 heads of 128, page 128, sm_90a); a fresh copy for mutation."""
    return copy.deepcopy(_BASE)


def subprocess_env(cache_dir: Path | str, **extra: str) -> dict[str, str]:
    """Environment for `python -m kvgen.cli` subprocesses: kvgen importable, cache isolated."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["KVGEN_CACHE_DIR"] = str(cache_dir)
    env.pop("KVGEN_NO_CACHE", None)
    env.pop("KVGEN_NO_COMPILE", None)
    env.pop("KVGEN_FAILED_DIR", None)
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point kvgen's compile cache at a fresh temp dir so no test touches ~/.cache."""
    d = tmp_path_factory.mktemp("kvgen-cache")
    monkeypatch.setenv("KVGEN_CACHE_DIR", str(d))
    monkeypatch.delenv("KVGEN_NO_CACHE", raising=False)
    monkeypatch.delenv("KVGEN_NO_COMPILE", raising=False)
    monkeypatch.setenv("KVGEN_FAILED_DIR", str(d / "failed"))
    return d
