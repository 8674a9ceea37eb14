"""job.toml: loading and validation with pydantic, and errors that name the key and the fix.

A job file has the sections below; feature sections (`secagg`, `dp`, `ray`) are validated by the subsystem that
owns them, so this module needs no knowledge of those features.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tessera.core.errors import ConfigError
from tessera.core.logging import get_logger

log = get_logger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobSection(_Section):
    name: str = "job"
    rounds: int = Field(10, ge=1)
    seed: int = 0
    output_dir: str = "runs/job"
    backend: Literal["inprocess", "ray"] = "inprocess"
    checkpoint_every: int = Field(1, ge=1)
    tensorboard: bool = False  # also log every round's record to <output_dir>/tensorboard
    mlflow: bool = False  # ... and to an MLflow file store in <output_dir>/mlruns, when mlflow is installed

    def loggers(self) -> tuple[str, ...]:
        """The tracker names for MetricsWriter(loggers=...)."""
        return tuple(name for name, on in (("tensorboard", self.tensorboard), ("mlflow", self.mlflow)) if on)


class DataSection(_Section):
    dataset: str = "digits"  # digits | breast_cancer | "module:function" returning (x, y) numpy arrays
    num_clients: int = Field(10, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    central_test_fraction: float = Field(0.0, ge=0, lt=1)


class ModelSection(_Section):
    name: str = "mlp"  # mlp | logreg | "module:Class"
    hidden: list[int] = [64]
    kwargs: dict[str, Any] = {}


class TrainSection(_Section):
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    device: str | None = None  # "auto", "cpu", "cuda", "cuda:N", "mps": where clients train (docs/gpu.md)
    precision: Literal["32", "bf16", "fp16"] = "32"  # "bf16"/"fp16": autocast (fp16 with loss scaling)


class StrategySection(BaseModel):
    """`name` picks the strategy; every other key is a constructor argument of that strategy."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "fedavg"

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScheduleSection(_Section):
    """How the coordinator schedules training (docs/pacing.md): `sync` rounds; `deadline` rounds on the real clock
    (one of `seconds` or `steps` per round; late replies `drop` or `fold`); asynchronous `fedbuff` (a server step
    every `buffer_size` updates, `concurrency` clients training; both default to the FedBuff strategy's)."""

    POLICY_KEYS: ClassVar[dict[str, frozenset[str]]] = {
        "sync": frozenset(),
        "deadline": frozenset({"seconds", "steps", "grace", "late", "staleness_exponent"}),
        "fedbuff": frozenset({"buffer_size", "concurrency", "max_failures"}),
    }

    policy: Literal["sync", "deadline", "fedbuff"] = "sync"
    seconds: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)
    grace: float | None = Field(None, ge=0)
    late: Literal["drop", "fold"] = "drop"
    staleness_exponent: float = Field(0.5, ge=0)
    buffer_size: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    max_failures: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _fits_policy(self) -> ScheduleSection:
        foreign = sorted((self.model_fields_set - {"policy"}) - self.POLICY_KEYS[self.policy])
        if foreign:
            owner = next((p for p, keys in self.POLICY_KEYS.items() if foreign[0] in keys), "")
            raise ValueError(f"{foreign[0]} is an option of policy = {owner!r}, not {self.policy!r}; remove it or "
                             f"set policy = {owner!r}")
        if self.policy == "deadline" and (self.seconds is None) == (self.steps is None):
            raise ValueError("policy = 'deadline' needs exactly one of seconds (a wall-clock budget per round) "
                             "or steps (a step budget)")
        return self


class JobConfig(_Section):
    job: JobSection = JobSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    strategy: StrategySection = StrategySection()
    schedule: ScheduleSection | None = None
    secagg: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None
    ray: dict[str, Any] | None = None


S = TypeVar("S", bound=BaseModel)


def format_validation_error(exc: ValidationError, *, source: str, model: type[BaseModel] | None = None) -> str:
    """pydantic's report as one line naming each key; with `model`, an unknown key gets a "did you mean" and a
    top-level key that belongs to a section is pointed to it (`rounds` -> [job])."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(model, err["loc"]) if model else "unknown key; remove it or check its spelling"
        head, sep, rest = msg.partition(": ")
        if not err["loc"] and sep and head.isidentifier():  # a check across keys that names the key to fix
            parts.append(f"{source}.{head}: {rest}")
        elif not err["loc"]:
            parts.append(f"{source}: {msg}")
        else:
            parts.append(f"{source}: {key}: {msg}")
    return "; ".join(parts)


def _section_model(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    cls: Any = model
    for part in loc:
        field = cls.model_fields.get(str(part)) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        cls = field.annotation
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unknown_key(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    name, where = str(loc[-1]), _section_model(model, loc[:-1])
    known = list(where.model_fields) if where is not None else []
    if len(loc) == 1:  # a top-level key: perhaps one that belongs in a section
        homes = [sec for sec in known if name in getattr(_section_model(model, (sec,)), "model_fields", {})]
        if homes:
            return f"a key of [{homes[0]}], not a section; move it under [{homes[0]}]"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}" if known else ""
    return "unknown key; " + (hint or "remove it or check its spelling")


class PluginConfig(BaseModel):
    """The one config model of a plugin: the same object validates a job.toml section and Python keyword
    arguments (`DPConfig(noise_multiplier=1.1)`), and either way a bad value is a one-line ConfigError naming the
    section and key. Subclasses set `SECTION` and declare fields with their bounds; checks across fields go in a
    pydantic `model_validator` raising ValueError with the fix."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SECTION: ClassVar[str] = "plugin"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source=self.SECTION, model=type(self))) from None


def validate(model: type[S], data: dict[str, Any], *, source: str) -> S:
    """Validate `data` against `model`, turning pydantic's report into a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source, model=model)) from None


def read_toml(path: str | Path, *, what: str = "job.toml", flag: str = "") -> dict[str, Any]:
    """Parse a TOML file; a missing file is one line naming `flag` (e.g. --federation) and `what` it should be."""
    p = Path(path)
    if not p.is_file():
        given = f"{flag} {p}" if flag else str(p)
        raise ConfigError(f"{given}: no such file; pass the path of your {what}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


SECTIONS = ("job", "data", "model", "train", "strategy")


def load_job(path: str | Path, *, warn_missing: bool = True) -> JobConfig:
    """Read and validate a job.toml. Sections it leaves out take their defaults (examples/hfl/job.toml lists them;
    `tessera simulate JOB --print-config` shows the resolved job); each missing one is named in a warning."""
    raw = read_toml(path)
    cfg = validate(JobConfig, raw, source=str(path))
    missing = [name for name in SECTIONS if name not in raw]
    if missing and warn_missing:
        log.warning("%s has no %s section(s): using their defaults (`tessera simulate %s --print-config` shows them)",
                    path, ", ".join(f"[{m}]" for m in missing), path)
    return cfg


def to_toml(cfg: BaseModel) -> str:
    """A validated job as TOML text (what --print-config prints): every section, every key, defaults included."""
    lines: list[str] = []
    for section, value in cfg.model_dump().items():
        if value is None:
            continue
        lines += [f"[{section}]", *(f"# {k}: unset" if v is None else f"{k} = {_toml_value(v)}"
                                    for k, v in value.items()), ""]
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))
