"""federation.toml: who takes part, where the coordinator listens, which certificates prove who is who.

Example (paths are relative to the folder of federation.toml)::

    [federation]
    ca_cert = "certs/ca.crt"
    # max_message_bytes = 536870912   # a fixed ceiling; leave it out to let the ceiling follow the model
    chunk_bytes = 1048576             # frames on the wire carry at most this much payload (1 MiB)
    # reply_buffer_bytes = 67108864   # replies reassembled at once; a larger one waits for the fold before it
    # reply_spool_dir = "spool"       # larger replies wait on disk there instead (coordinator memory: no reply)
    # receive_window_bytes = 4194304  # a fixed gRPC receive window per stream instead of the probed one

    [[parties]]
    name = "server"
    role = "coordinator"
    address = "127.0.0.1:50051"       # clients dial this; the coordinator listens on it (or on `listen`)

    [[parties]]
    name = "alice"                    # cert/key default to certs/<name>.crt and certs/<name>.key
    role = "client"

The i-th `client` party (in file order) serves the job's i-th client partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tessera.core.config import read_toml, validate
from tessera.core.errors import ConfigError
from tessera.runtime.federation import Federation, Party, Role

_RESERVED = {"localhost"}  # every issued cert carries SAN DNS=localhost, so no party may claim that name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySection(_Section):
    """How a client redials the coordinator after a failed or broken connection (exponential backoff)."""

    max_attempts: int = Field(20, ge=1)
    initial_backoff_s: float = Field(0.5, gt=0)
    max_backoff_s: float = Field(10.0, gt=0)
    multiplier: float = Field(2.0, ge=1)


class FederationSection(_Section):
    name: str = "federation"
    ca_cert: str = "certs/ca.crt"
    certs_dir: str = "certs"
    # None (default): the ceiling follows the model (see `ceiling`); an int: a fixed ceiling in both directions
    max_message_bytes: int | None = Field(None, ge=1024)
    chunk_bytes: int = Field(1024**2, ge=1024, le=64 * 1024**2)
    round_deadline_s: float = Field(600.0, gt=0)  # the fit exchange of a round (each stage under SecAgg+)
    rpc_deadline_s: float = Field(600.0, gt=0)  # one request -> reply at one client (includes its training)
    quorum_deadline_s: float = Field(120.0, gt=0)  # how long the coordinator waits for clients before round 1
    rejoin_wait_s: float = Field(0.0, ge=0)  # before each fit phase, wait this long for disconnected clients
    hello_deadline_s: float = Field(5.0, gt=0)  # a stream that names no party within this is closed
    max_streams_per_party: int = Field(2, ge=1)  # open streams one certificate may hold (a reconnect overlaps one)
    # replies the coordinator reassembles at once: a reply that would go past this waits (its sender is paused by
    # flow control) until the ones before it are folded, unless it is the only one; so the coordinator holds one
    # model-sized reply, not one per client
    reply_buffer_bytes: int = Field(64 * 1024**2, ge=0)
    # a folder (relative to federation.toml) where the coordinator keeps a reply larger than reply_buffer_bytes
    # while it arrives, instead of in memory: then it holds the global params and its sum, not a reply as well
    reply_spool_dir: str | None = None
    # None: gRPC grows each stream's receive window to the link's bandwidth-delay product (tens of MiB per busy
    # stream); an int: a fixed window per stream, which bounds what a sending party parks in this party's memory
    # and caps each stream's rate at window / round-trip time
    receive_window_bytes: int | None = Field(None, ge=64 * 1024, le=1024**3)
    retry: RetrySection = RetrySection()

    @model_validator(mode="after")
    def _chunks_fit(self) -> FederationSection:
        if self.max_message_bytes is not None and self.chunk_bytes > self.max_message_bytes:
            raise ValueError(f"chunk_bytes ({self.chunk_bytes}) must not exceed max_message_bytes "
                             f"({self.max_message_bytes})")
        return self


class PartySection(_Section):
    name: str
    role: Literal["coordinator", "client"] = "client"
    address: str | None = None  # host:port; required for the coordinator
    listen: str | None = None  # coordinator only: bind address if it differs from `address` (e.g. 0.0.0.0:50051)
    cert: str | None = None
    key: str | None = None
    device: str | None = None  # where this party trains (auto, cpu, cuda, cuda:N, mps); `--device` overrides it


class FederationFile(_Section):
    federation: FederationSection = FederationSection()
    parties: list[PartySection] = Field(min_length=2)


@dataclass(frozen=True)
class PartyConfig:
    name: str
    role: Role
    address: str | None
    listen: str | None
    cert: Path
    key: Path
    device: str | None = None


@dataclass(frozen=True)
class FederationConfig:
    """A validated federation.toml with every path resolved against the file's folder."""

    settings: FederationSection
    parties: tuple[PartyConfig, ...]
    ca_cert: Path
    source: str
    spool_dir: Path | None = None  # `reply_spool_dir`, resolved

    @property
    def coordinator(self) -> PartyConfig:
        return next(p for p in self.parties if p.role is Role.COORDINATOR)

    @property
    def client_names(self) -> list[str]:
        return [p.name for p in self.parties if p.role is Role.CLIENT]

    def party(self, name: str) -> PartyConfig:
        for p in self.parties:
            if p.name == name:
                return p
        raise ConfigError(f"{self.source}: no party named {name!r}; parties are {[p.name for p in self.parties]}")

    def federation(self) -> Federation:
        return Federation(tuple(Party(p.name, p.role, p.address) for p in self.parties))


def _check_address(addr: str, key: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: {addr!r} is not host:port (e.g. 127.0.0.1:50051)")


def build(data: dict[str, object], *, source: str, base: Path) -> FederationConfig:
    """Validate parsed TOML (`base` resolves relative paths)."""
    raw = validate(FederationFile, data, source=source)
    fed = raw.federation
    coords = [p for p in raw.parties if p.role == "coordinator"]
    if len(coords) != 1:
        raise ConfigError(f"{source}: parties: exactly one party needs role = \"coordinator\", found {len(coords)}")
    if len(coords) == len(raw.parties):
        raise ConfigError(f"{source}: parties: add at least one party with role = \"client\"")
    parties = []
    for i, p in enumerate(raw.parties):
        if p.name.lower() in _RESERVED:
            raise ConfigError(f"{source}: parties.{i}.name: {p.name!r} is reserved; pick another name")
        if p.role == "coordinator":
            if p.address is None:
                raise ConfigError(f"{source}: parties.{i}.address: the coordinator needs host:port")
            _check_address(p.address, f"{source}: parties.{i}.address")
            if p.listen is not None:
                _check_address(p.listen, f"{source}: parties.{i}.listen")
        cert = base / (p.cert or f"{fed.certs_dir}/{p.name}.crt")
        key = base / (p.key or f"{fed.certs_dir}/{p.name}.key")
        parties.append(PartyConfig(p.name, Role(p.role), p.address, p.listen, cert, key, p.device))
    try:
        Federation(tuple(Party(p.name, p.role) for p in parties))
    except ConfigError as exc:
        raise ConfigError(f"{source}: parties: {exc}") from None
    spool = base / fed.reply_spool_dir if fed.reply_spool_dir is not None else None
    return FederationConfig(fed, tuple(parties), base / fed.ca_cert, source, spool)


def load_federation(path: str | Path) -> FederationConfig:
    """Read and validate federation.toml; errors name the key and the fix."""
    p = Path(path)
    return build(read_toml(p, what="federation.toml", flag="--federation"), source=str(p), base=p.resolve().parent)


def read_pem(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist; create it with `tessera certs init` / "
                          "`tessera certs issue --name NAME`, or fix the path in federation.toml")
    return path.read_bytes()
