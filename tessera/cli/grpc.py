"""`tessera certs init|issue` and `tessera party`: run a job as one process per organisation over gRPC + mTLS.

The coordinator and every client load the same job.toml (`--job`, tessera.horizontal.deploy) or split app
(`--split`, tessera.vertical.deploy) and the same federation.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tessera.core.errors import ConfigError, ShapeMismatch
from tessera.core.logging import setup_logging

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


def _say(line: str) -> None:
    console.print(line, highlight=False)


def register(app: typer.Typer) -> None:
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
        state_dir: Annotated[Path | None, typer.Option(help="client (--job): folder where this party keeps its "
                                                            "privacy ledger and SecAgg replay state across restarts"
                                                            )] = None,
        resume: Annotated[bool, typer.Option(help="coordinator: continue from the checkpoint")] = False,
        serve: Annotated[bool, typer.Option(help="split learning, after training: owners serve embeddings of "
                                                 "--serve-split rows, the coordinator writes OUT/predictions.tsr")
                         ] = False,
        serve_split: Annotated[str, typer.Option(help="split learning --serve: which rows to predict")] = "predict",
        overwrite: Annotated[bool, typer.Option(help="coordinator: replace a run already in the output folder")
                             ] = False,
        plots: Annotated[bool, typer.Option(help="coordinator: write PNG curves at the end")] = True,
        log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
        device: Annotated[str | None, typer.Option(help="where this party trains: auto, cpu, cuda, cuda:N, mps "
                                                        "(default: its federation.toml device, else job.toml "
                                                        "[train] device)")] = None,
    ) -> None:
        """Run one party of a federation: the coordinator drives the rounds, clients dial in and train."""
        from tessera.runtime.federation import Role
        from tessera.runtime.grpc.config import load_federation
        from tessera.runtime.grpc.process import check_identity

        setup_logging(log_level.upper())
        fed = load_federation(federation)
        me = fed.party(name)
        if (job is None) == (split is None):
            raise ConfigError("give --job job.toml (horizontal) or --split APP (split learning), not both")
        check_identity(me)  # a key that is not the certificate's: one line now, not a TLS error loop later
        if split is not None:
            from tessera.vertical.deploy import load_split_app, run_split_label, run_split_owner

            app_ = load_split_app(split)
            if serve:
                from tessera.vertical.serve_app import serve_split_label, serve_split_owner

                if me.role is Role.COORDINATOR:
                    serve_split_label(fed, app_, out, split=serve_split, notify=_say)
                else:
                    serve_split_owner(fed, name, app_, out, split=serve_split, notify=_say)
                return
            if me.role is Role.COORDINATOR:
                run_split_label(fed, app_, out, resume=resume, overwrite=overwrite, plots=plots, notify=_say)
            else:
                run_split_owner(fed, name, app_, out, notify=_say)
            return
        assert job is not None
        from tessera.cli.jobs import build_parts, build_plugins, build_scheduling, load_job_file, preflight
        from tessera.horizontal.deploy import client_routes, run_client, run_coordinator
        from tessera.horizontal.job import compose
        from tessera.secagg.pki import CertPKI

        cfg = load_job_file(job)
        parts = build_parts(cfg, device=device or me.device)
        routes = client_routes(fed, parts.clients)
        mine = next((c for c, p in routes.items() if p == name), None)
        try:
            preflight(parts, mine)  # the coordinator checks the first client's partition, a client its own
        except ShapeMismatch as exc:
            raise ShapeMismatch(f"{job}: [model] {cfg.model.name!r} does not fit [data] {cfg.data.dataset!r}: "
                                f"{exc}") from None
        # SecAgg+ signs its round keys with this party's certificate key (malicious-coordinator protection).
        pki = CertPKI.from_files(name, ca_cert=fed.ca_cert, cert=me.cert, key=me.key, names=routes)
        parts = compose(parts, build_plugins(cfg, secagg_pki=pki))
        if me.role is Role.COORDINATOR:
            j = cfg.job
            run_coordinator(fed, parts, rounds=j.rounds, seed=j.seed, output_dir=j.output_dir,
                            checkpoint_every=j.checkpoint_every, resume=resume, overwrite=overwrite, plots=plots,
                            loggers=j.loggers(), notify=_say, scheduling=build_scheduling(cfg))
        else:
            run_client(fed, name, parts, state_dir=state_dir, notify=_say)
