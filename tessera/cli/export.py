"""`tessera export JOB`, `tessera inspect BUNDLE`, `tessera verify BUNDLE`: a trained job's model as a bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tessera.core.errors import TesseraError

console = Console()


def export_job(job: Path, out: Path, *, fp16: bool = False, onnx: bool = False, rows: int = 8,
               max_shard_mb: float = 2048.0, tar: bool = False, overwrite: bool = False,
               sign_cert: Path | None = None, sign_key: Path | None = None) -> Path:
    """Bundle the global model of a finished `tessera simulate` run (its checkpoint in job.output_dir)."""
    import torch

    from tessera.cli.jobs import build_model_fn, load_job_file, split_data
    from tessera.core.types import set_params
    from tessera.export import Provenance, save_bundle
    from tessera.horizontal.checkpoint import CHECKPOINT, load_checkpoint

    cfg = load_job_file(job)
    ckpt = Path(cfg.job.output_dir) / CHECKPOINT
    if not ckpt.is_file():
        raise TesseraError(f"{ckpt} does not exist; run `tessera simulate {job}` first")
    state = load_checkpoint(ckpt)
    data, central, in_features, num_classes = split_data(cfg)
    model = build_model_fn(cfg, in_features, num_classes)()
    set_params(model, state["params"], who="checkpoint params")
    x = central[0] if central is not None else next(iter(data.values()))[2]
    example = torch.from_numpy(x[:rows])
    prov = Provenance.from_history(state["history"], strategy=cfg.strategy.name, parties=list(data),
                                   secure_aggregation=str(cfg.secagg.get("name", "secagg+")) if cfg.secagg else None)
    kwargs = None if cfg.model.name in ("mlp", "logreg") else dict(cfg.model.kwargs)
    dest = out.with_suffix(".tar") if tar and out.suffix != ".tar" else out
    if (sign_cert is None) != (sign_key is None):
        raise TesseraError("--sign-cert and --sign-key go together: give the party's certificate and its key")
    signer = None
    if sign_cert is not None and sign_key is not None:
        from tessera.export.sign import SigningKey

        signer = SigningKey.from_files(sign_cert, sign_key)
    return save_bundle(model, dest, example_inputs=example, provenance=prov, kwargs=kwargs,
                       dtype=torch.float16 if fp16 else None, onnx=onnx, overwrite=overwrite,
                       max_shard_bytes=max(1, int(max_shard_mb * 1024**2)), sign_with=signer)


def register(app: typer.Typer) -> None:
    @app.command(name="export")
    def export_cmd(
        job: Annotated[Path, typer.Argument(help="job.toml of a finished `tessera simulate` run")],
        *,
        out: Annotated[Path, typer.Option(help="bundle directory (or .tar) to write")] = Path("bundle"),
        fp16: Annotated[bool, typer.Option(help="store float16 weights (tolerance widened and reported)")] = False,
        onnx: Annotated[bool, typer.Option(help="add a model.onnx verified with ONNX Runtime")] = False,
        rows: Annotated[int, typer.Option(help="reference rows taken from the test data")] = 8,
        max_shard_mb: Annotated[float, typer.Option(help="start a new safetensors shard above this size")] = 2048.0,
        tar: Annotated[bool, typer.Option(help="write a single .tar file instead of a directory")] = False,
        overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
        sign_cert: Annotated[Path | None, typer.Option(help="sign with this party certificate (from `tessera "
                                                            "certs`) ...")] = None,
        sign_key: Annotated[Path | None, typer.Option(help="... and its private key")] = None,
    ) -> None:
        """Export the trained global model of a job as a bundle (safetensors + manifest.json + reference)."""
        from tessera.export import inspect_bundle

        path = export_job(job, out, fp16=fp16, onnx=onnx, rows=rows, max_shard_mb=max_shard_mb, tar=tar,
                          overwrite=overwrite, sign_cert=sign_cert, sign_key=sign_key)
        for table in inspect_bundle(path):
            console.print(table)
        console.print(f"wrote {path}; check it anywhere with `tessera verify {path}`")

    @app.command()
    def inspect(bundle: Annotated[Path, typer.Argument(help="bundle directory or .tar")],
                params: Annotated[int, typer.Option(help="how many parameter rows to list")] = 12) -> None:
        """Show a bundle's manifest: architecture, parameters, files, provenance, privacy spent."""
        from tessera.export.io import open_bundle
        from tessera.export.manifest import read_manifest
        from tessera.export.verify import manifest_table

        with open_bundle(bundle) as root:
            for table in manifest_table(read_manifest(root), max_params=params):
                console.print(table)

    @app.command()
    def verify(
        bundle: Annotated[Path, typer.Argument(help="bundle directory or .tar")],
        allow: Annotated[list[str] | None, typer.Option(help="trust this module (prefix) for rebuilding")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
        trust: Annotated[Path | None, typer.Option(help="require a signature by a party of this federation CA "
                                                        "(ca.crt)")] = None,
        signer: Annotated[str | None, typer.Option(help="with --trust: the party that must have signed")] = None,
    ) -> None:
        """Check every hash, rebuild the model without pickle, rerun the reference inputs, compare outputs."""
        from tessera.export import verify_bundle
        from tessera.export.sign import Trust
        from tessera.export.verify import report_table

        if signer is not None and trust is None:
            raise TesseraError("--signer needs --trust ca.crt (the federation CA the signer's certificate is from)")
        trusted = Trust.from_ca(trust, signer=signer) if trust is not None else None
        report = verify_bundle(bundle, allow=allow or [], raise_on_mismatch=False, trust=trusted)
        if as_json:
            typer.echo(json.dumps(report.to_json()))
        else:
            console.print(report_table(report))
        if not report.ok:
            raise TesseraError(f"{bundle}: outputs differ from the reference beyond tolerance; do not serve it")

