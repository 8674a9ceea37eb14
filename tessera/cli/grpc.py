"""`tessera certs init|issue` and `tessera party`: run a job as one process per organisation over gRPC + mTLS.

The coordinator and every client load the same job.toml and federation.toml. The i-th client party in
federation.toml serves the job's i-th client partition, and the coordinator uses the job's client ids for seeds,
so a deployed run reproduces `tessera simulate job.toml` bit for bit.

Split learning runs the same way with `--split APP` instead of `--job`: APP (a module or a .py file, optionally
`:attr`) defines `owner(name, out) -> DataOwner`, `label_party(name, backend, out) -> SplitTrainer` and `FIT`
(the keyword arguments of `SplitTrainer.fit`). The coordinator is the label party; every client party is a data
owner. `run_split_inprocess(app, ...)` runs the same app in one process (the oracle of the deployed run).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from tessera.core.errors import ConfigError, ProtocolError, RoundFailed, TransportError
from tessera.core.logging import setup_logging

if TYPE_CHECKING:
    from tessera.core.config import JobConfig
    from tessera.core.metrics import History
    from tessera.horizontal.simulation import JobParts
    from tessera.runtime.grpc.backend import GrpcBackend
    from tessera.runtime.grpc.config import FederationConfig
    from tessera.runtime.grpc.party import ClientParty

console = Console()
certs_app = typer.Typer(help="Create the federation CA and party certificates.", no_args_is_help=True)


@certs_app.command("init")
def certs_init(
    out: Annotated[Path, typer.Option("--dir", help="folder for ca.crt and ca.key")] = Path("certs"),
    force: Annotated[bool, typer.Option(help="replace an existing CA (every party cert must be reissued)")] = False,
) -> None:
    """Create the federation CA (EC P-256): ca.crt goes to every party, ca.key stays with whoever issues certs."""
    from tessera.runtime.grpc.certs import init_ca

    crt, key = init_ca(out, force=force)
    console.print(f"CA certificate: {crt}\nCA key (0600, keep it offline): {key}")


@certs_app.command("issue")
def certs_issue(
    name: Annotated[str, typer.Option(help="party name exactly as in federation.toml")],
    out: Annotated[Path, typer.Option("--dir", help="folder to write NAME.crt and NAME.key")] = Path("certs"),
    ca_dir: Annotated[Path | None, typer.Option(help="folder holding ca.crt and ca.key (default: --dir)")] = None,
    host: Annotated[list[str] | None, typer.Option(help="extra SAN host name or IP (repeatable); parties verify "
                                                        "each other by party name, so this is only for other TLS "
                                                        "tools")] = None,
    force: Annotated[bool, typer.Option(help="replace existing files")] = False,
) -> None:
    """Issue a party certificate signed by the federation CA (CN and SAN DNS = NAME, plus localhost/127.0.0.1)."""
    from tessera.runtime.grpc.certs import DEFAULT_HOSTS, issue

    crt, key = issue(out, name, ca_dir=ca_dir, hosts=[*DEFAULT_HOSTS, *(host or [])], force=force)
    console.print(f"certificate: {crt}\nkey (0600): {key}")


def job_parts(cfg: JobConfig) -> JobParts:
    from tessera.cli.jobs import build_parts, build_plugins

    parts = build_parts(cfg)
    for plugin in build_plugins(cfg):
        plugin.configure(parts)
    return parts


def client_routes(fed: FederationConfig, clients: list[str]) -> dict[str, str]:
    """Job client id -> party name: the i-th client party serves the i-th partition."""
    names = fed.client_names
    if len(names) != len(clients):
        raise ConfigError(f"the job has {len(clients)} clients (data.num_clients) but {fed.source} lists "
                          f"{len(names)} client parties; make them equal (the i-th client party serves partition i)")
    return dict(zip(clients, names, strict=True))


class _Stopper:
    """First SIGTERM/SIGINT: finish the round in flight, then stop. Second: abandon it now."""

    def __init__(self, backend: GrpcBackend) -> None:
        self.backend = backend
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.backend.abort("coordinator interrupted twice: round abandoned")
        self.requested = True
        self.backend.stop_waiting()


def run_coordinator(fed: FederationConfig, cfg: JobConfig, *, resume: bool = False,
                    plots: bool = True) -> History:
    from tessera.core.metrics import plot_history
    from tessera.horizontal.server import Server, ServerConfig
    from tessera.horizontal.simulation import initial_params
    from tessera.runtime.grpc.backend import GrpcBackend

    parts = job_parts(cfg)
    backend = GrpcBackend(fed, client_routes(fed, parts.clients), min_clients=parts.strategy.min_available)
    server = Server(strategy=parts.strategy, backend=backend, clients=parts.clients,
                    initial_params=initial_params(parts.task, cfg.job.seed),
                    config=ServerConfig(rounds=cfg.job.rounds, seed=cfg.job.seed, output_dir=cfg.job.output_dir,
                                        checkpoint_every=cfg.job.checkpoint_every,
                                        fit_timeout=fed.settings.round_deadline_s),
                    aggregation=parts.aggregation, central_eval=parts.central_eval, extensions=parts.extensions)
    stopper = _Stopper(backend)
    if resume:
        server.resume()
    port = backend.listen()
    console.print(f"coordinator {fed.coordinator.name} listening on port {port}; waiting for "
                  f"{len(parts.clients)} clients", highlight=False)
    try:
        try:
            backend.start(parts.clients)
        except TransportError:
            if not stopper.requested:
                raise
        _rounds(server, cfg.job.rounds, stopper)
    finally:
        server.save_checkpoint()
        backend.close()
        _write_transport(Path(cfg.job.output_dir), backend)
    if plots and len(server.history):
        plot_history(server.history, cfg.job.output_dir)
    return server.history


def _rounds(server: Any, rounds: int, stopper: _Stopper) -> None:
    every = server.config.checkpoint_every
    while server.round < rounds and not stopper.requested:
        rnd = server.round + 1
        try:
            record = server.run_round(rnd)
        except (RoundFailed, ProtocolError):  # a second signal fails every request in flight
            if stopper.requested:
                console.print(f"round {rnd} abandoned on shutdown; the checkpoint holds round {server.round}")
                return
            raise
        server.round = rnd
        server.history.append(record)
        if server.writer is not None:
            server.writer.write(record)
        if rnd % every == 0 or rnd == rounds:
            server.save_checkpoint()
        console.print(f"round {rnd} done: {record['clients_succeeded']} ok, {record['clients_failed']} failed, "
                      f"train_loss {record.get('train_loss', float('nan')):.4f}", highlight=False)
    if stopper.requested:
        console.print(f"stopped on signal after round {server.round}; resume with --resume")


def _write_transport(out: Path, backend: GrpcBackend) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t = backend.traffic
    report = {"bytes_up": t.up, "bytes_down": t.down, "per_client": t.per_client,
              "refused": [{"claimed": r.claimed, "reason": r.reason} for r in backend.refused]}
    (out / "transport.json").write_text(json.dumps(report, indent=2))


def run_client(fed: FederationConfig, name: str, cfg: JobConfig) -> int:
    from tessera.runtime.grpc.party import ClientParty

    parts = job_parts(cfg)
    routes = client_routes(fed, parts.clients)
    client_id = next(c for c, p in routes.items() if p == name)
    party = ClientParty(fed, name, parts.client_app(), expected_client_id=client_id)
    return _serve(party, f"party {name} (client {client_id}) dialling {fed.coordinator.address}")


# ------------------------------------------------------------------------------------------- split learning
def load_split_app(ref: str) -> Any:
    """`pkg.module`, `pkg.module:attr`, `path/app.py` or `path/app.py:attr` -> the object with owner/label_party/FIT."""
    where, _, attr = ref.rpartition(":") if ":" in ref else (ref, "", "")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if spec is None or spec.loader is None or not Path(where).is_file():
                raise ImportError(where)
            mod: Any = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
        app = getattr(mod, attr) if attr else mod
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--split: cannot load {ref!r} ({type(exc).__name__}: {exc}); give a module or .py file "
                          "defining owner(name, out), label_party(name, backend, out) and FIT") from None
    missing = [n for n in ("owner", "label_party", "FIT") if not hasattr(app, n)]
    if missing:
        raise ConfigError(f"--split {ref}: missing {missing}; a split app defines owner(name, out) -> DataOwner, "
                          "label_party(name, backend, out) -> SplitTrainer and FIT (SplitTrainer.fit arguments)")
    return app


class _StopAfterEpoch(Exception):
    """Raised from the epoch callback once a shutdown was requested (the epoch's checkpoint is already written)."""


def run_split_label(fed: FederationConfig, app: Any, out: Path, *, resume: bool = False) -> History:
    """The coordinator of a split job: the label party, driving every data owner over gRPC."""
    from tessera.runtime.grpc.backend import GrpcBackend

    owners = fed.client_names
    backend = GrpcBackend(fed, {o: o for o in owners}, min_clients=len(owners))
    trainer = app.label_party(fed.coordinator.name, backend, out)
    if trainer.label_party != fed.coordinator.name or sorted(trainer.owners) != sorted(owners):
        raise ConfigError(f"{fed.source}: the split app's label party {trainer.label_party!r} and owners "
                          f"{trainer.owners} must be the coordinator {fed.coordinator.name!r} and the client "
                          f"parties {owners}")
    if trainer.timeout is None:
        trainer.timeout = fed.settings.rpc_deadline_s
    stopper = _Stopper(backend)

    def after_epoch(record: dict[str, Any]) -> None:
        console.print(f"epoch {record['epoch']} done: train_loss {record['train_loss']:.4f}", highlight=False)
        if stopper.requested:
            raise _StopAfterEpoch

    console.print(f"label party {fed.coordinator.name} listening on port {backend.listen()}; waiting for owners "
                  f"{owners}", highlight=False)
    try:
        if resume:
            trainer.resume()
        trainer.fit(**app.FIT, progress=after_epoch)
    except _StopAfterEpoch:
        console.print(f"stopped on signal after epoch {trainer.epoch}; resume with --resume")
    except (ProtocolError, TransportError) as exc:
        if not stopper.requested:
            raise RoundFailed(f"split step {trainer.step} failed: {exc}. The checkpoint holds epoch "
                              f"{_checkpoint_epoch(out)}; restart the missing party and run again with --resume") \
                from None
        console.print(f"epoch abandoned on shutdown; the checkpoint holds epoch {_checkpoint_epoch(out)}")
    finally:
        backend.close()
        _write_transport(out, backend)
    history: History = trainer.history
    return history


def _checkpoint_epoch(out: Path) -> int:
    from tessera.core import serde
    from tessera.vertical.checkpoint import CHECKPOINT

    path = out / CHECKPOINT
    return int(serde.loads(path.read_bytes())["label"]["epoch"]) if path.exists() else 0


def run_split_owner(fed: FederationConfig, name: str, app: Any, out: Path) -> int:
    """A data owner: serve embeddings and take gradient steps until the label party says BYE."""
    from tessera.runtime.grpc.party import ClientParty

    party = ClientParty(fed, name, app.owner(name, out), expected_client_id=name)
    return _serve(party, f"data owner {name} dialling {fed.coordinator.address}")


def _serve(party: ClientParty, intro: str) -> int:
    """Run a client party until the coordinator says BYE or a signal stops it (a clean stop exits 0)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: party.stop())
    console.print(intro, highlight=False)
    stats = party.run()
    console.print(f"party {party.me.name} done: {stats.requests} requests served over {stats.connections} "
                  "connection(s)", highlight=False)
    return 0


def run_split_inprocess(app: Any, *, label: str, owners: list[str], out: Path) -> Any:
    """The same split app in one process (`out/<party>` per party): the oracle a deployed run must equal.
    Returns the trained SplitTrainer; the owners are reachable as `trainer.backend.handler.owners`."""
    from tessera.runtime.backend import InProcessBackend
    from tessera.vertical.owner import OwnerGroup

    backend = InProcessBackend(OwnerGroup([app.owner(o, out / o) for o in owners]))
    trainer = app.label_party(label, backend, out / label)
    trainer.fit(**app.FIT)
    return trainer


def register(app: typer.Typer, demos: dict[str, Callable[[Path, bool], None]]) -> None:
    from tessera.cli.grpc_demo import demo_grpc

    demos["grpc"] = demo_grpc
    app.add_typer(certs_app, name="certs")

    @app.command()
    def party(  # noqa: PLR0917 - one argument per CLI option
        federation: Annotated[Path, typer.Option(help="federation.toml (parties, CA, limits, deadlines)")],
        name: Annotated[str, typer.Option(help="which party this process is")],
        job: Annotated[Path | None, typer.Option(help="job.toml (the same file at every party)")] = None,
        split: Annotated[str | None, typer.Option(help="split learning: module or .py file defining owner, "
                                                       "label_party and FIT (instead of --job)")] = None,
        out: Annotated[Path, typer.Option(help="split learning: this party's folder for state, metrics and "
                                               "checkpoints")] = Path("runs/split"),
        resume: Annotated[bool, typer.Option(help="coordinator: continue from the checkpoint")] = False,
        plots: Annotated[bool, typer.Option(help="coordinator: write PNG curves at the end")] = True,
        log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    ) -> None:
        """Run one party of a federation: the coordinator drives the rounds, clients dial in and train."""
        from tessera.core.config import load_job
        from tessera.runtime.federation import Role
        from tessera.runtime.grpc.config import load_federation

        setup_logging(log_level.upper())
        fed = load_federation(federation)
        me = fed.party(name)
        if (job is None) == (split is None):
            raise ConfigError("give --job job.toml (horizontal) or --split APP (split learning), not both")
        if split is not None:
            app_ = load_split_app(split)
            if me.role is Role.COORDINATOR:
                run_split_label(fed, app_, out, resume=resume)
            else:
                run_split_owner(fed, name, app_, out)
            return
        assert job is not None
        cfg = load_job(job)
        if me.role is Role.COORDINATOR:
            run_coordinator(fed, cfg, resume=resume, plots=plots)
        else:
            run_client(fed, name, cfg)
