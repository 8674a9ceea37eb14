"""Parties and their roles."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from tessera.core.errors import ConfigError


class Role(enum.Enum):
    COORDINATOR = "coordinator"  # HFL server / split-learning label party
    CLIENT = "client"  # HFL client / split-learning data owner


@dataclass(frozen=True)
class Party:
    name: str
    role: Role = Role.CLIENT
    address: str | None = None


@dataclass(frozen=True)
class Federation:
    parties: tuple[Party, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.parties]
        if len(set(names)) != len(names):
            raise ConfigError(f"party names must be unique, got {names}")
        if any(not n or not n.replace("-", "").replace("_", "").isalnum() for n in names):
            raise ConfigError(f"party names must be non-empty and alphanumeric (with - or _), got {names}")

    @classmethod
    def of_clients(cls, names: Sequence[str]) -> Federation:
        return cls(tuple(Party(n, Role.CLIENT) for n in names))

    @property
    def clients(self) -> list[str]:
        return [p.name for p in self.parties if p.role is Role.CLIENT]

    @property
    def coordinator(self) -> Party | None:
        return next((p for p in self.parties if p.role is Role.COORDINATOR), None)
