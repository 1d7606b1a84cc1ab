"""Errors kvgen raises. Each names what is wrong, the rule, the value received and a fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    field: str
    rule: str
    value: Any
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule} (got {self.value!r}). Fix: {self.fix}"


class ConfigError(Exception):
    """An invalid configuration; raised before anything is rendered or written."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where}invalid kvgen config ({len(problems)} problem(s)):\n{lines}")


class CompileError(Exception):
    """NVRTC rejected a rendered source. Carries the log and where the source was saved."""

    def __init__(self, variant: str, arch: str, log: str, source_path: str):
        self.variant, self.arch, self.log, self.source_path = variant, arch, log, source_path
        super().__init__(
            f"NVRTC failed to compile variant {variant} for {arch}; source saved at {source_path}\n{log}"
        )


class LaunchError(ValueError):
    """A kernel launch was refused because an argument would make it read or write out of bounds."""

    def __init__(self, kernel: str, argument: str, rule: str, value: Any, fix: str):
        self.argument, self.rule, self.value, self.fix = argument, rule, value, fix
        super().__init__(f"{kernel}: argument '{argument}': {rule} (got {value!r}). Fix: {fix}")
