"""``deltaplane keys|registry|serve``: signing keys, the model registry, and the device-facing service.

Every command takes ``--home`` (default ``$DELTAPLANE_HOME`` or ``~/.deltaplane``). Library errors end the
command with a one-line red message and exit code 2; ``registry verify`` exits 1 when it finds problems.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deltaplane.commands import clean_errors as _errors
from deltaplane.errors import ConfigError

__all__ = ["load_evaluator", "register"]

console = Console()
err_console = Console(stderr=True)

Home = Annotated[
    Path | None,
    typer.Option("--home", envvar="DELTAPLANE_HOME", help="Registry folder [default: ~/.deltaplane]."),
]


def _home(home: Path | None) -> Path:
    from deltaplane.registry import default_home

    return home if home is not None else default_home()


def load_evaluator(spec: str) -> Any:
    """Import ``package.module:callable``; the callable maps a state dict to metrics."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"evaluator must be 'package.module:function'. Found {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import evaluator {spec!r}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"evaluator {spec!r} is not callable")
    return fn


def _tolerance(items: list[str] | None) -> Any:
    from deltaplane.registry import Tolerance

    if not items:
        return Tolerance()
    limits = {}
    for item in items:
        k, sep, v = item.partition("=")
        try:
            limits[k.strip()] = float(v)
        except ValueError:
            sep = ""
        if not sep or not k.strip():
            raise ConfigError(f"tolerance must look like 'accuracy=0.01'. Found {item!r}")
    return Tolerance(limits)


def register(app: typer.Typer) -> None:
    """Add the ``keys``, ``registry`` and ``serve`` commands to ``app``."""
    keys = typer.Typer(help="Ed25519 signing keys.", no_args_is_help=True)
    reg_app = typer.Typer(
        help="Signed model/delta registry: versions, tags, promotion, rollback.", no_args_is_help=True
    )
    app.add_typer(keys, name="keys")
    app.add_typer(reg_app, name="registry")

    @keys.command("init")
    def keys_init(
        home: Home = None,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
    ) -> None:
        """Create the signing key pair under HOME/keys (private key mode 0600)."""
        from deltaplane.registry import init_keys

        with _errors():
            signer = init_keys(_home(home), overwrite=force)
        console.print(f"signing key [bold]{signer.key_id}[/bold] written to {_home(home) / 'keys'}")

    @keys.command("tls")
    def keys_tls(
        home: Home = None,
        host: Annotated[
            list[str] | None,
            typer.Option("--host", help="Server name or IP the certificate is valid for (repeatable)."),
        ] = None,
        device: Annotated[
            list[str] | None, typer.Option("--device", help="Also issue a client certificate (mutual TLS).")
        ] = None,
        out: Annotated[Path | None, typer.Option(help="Folder [default: HOME/tls].")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing CA.")] = False,
    ) -> None:
        """Create a private CA and a server certificate signed by it (keys 0600); devices trust ca.pem."""
        from deltaplane.serve.tls import make_tls_bundle

        with _errors():
            b = make_tls_bundle(
                out or _home(home) / "tls",
                hosts=host or ["127.0.0.1", "localhost"],
                devices=device or [],
                overwrite=force,
            )
        console.print(f"CA {b.ca_cert} (give this to devices); server {b.server_cert} + {b.server_key}")
        for d, (c, k) in b.devices.items():
            console.print(f"device {d}: {c} + {k}")

    @reg_app.command("init")
    def registry_init(
        home: Home = None,
        no_encrypt: Annotated[
            bool, typer.Option("--no-encrypt", help="Store blobs in plaintext (explicit opt-out).")
        ] = False,
    ) -> None:
        """Create a registry (and a signing key if there is none); blobs are encrypted at rest by default."""
        from deltaplane.registry import Registry

        with _errors():
            reg = Registry.create(_home(home), encrypt=not no_encrypt)
            at_rest = f"AES-256-GCM, key {reg.keyring.current}" if reg.encrypted else "plaintext (opted out)"
            console.print(f"registry ready at {reg.home} (signing key {reg.signer.key_id}; blobs: {at_rest})")

    @reg_app.command("rotate-key")
    def registry_rotate_key(
        home: Home = None,
        key_file: Annotated[
            Path | None, typer.Option(help="New KEK (base64 of 32 bytes) [default: a random one].")
        ] = None,
    ) -> None:
        """Re-wrap every blob's data key with a new key-encryption key; old key files are removed."""
        from deltaplane.registry import Registry
        from deltaplane.registry.encryption import parse_key

        with _errors():
            reg = Registry(_home(home))
            new = parse_key(key_file.read_bytes(), str(key_file)) if key_file else None
            n = reg.rotate_kek(new)
        console.print(f"{n} blobs re-wrapped with key {reg.keyring.current}")

    @reg_app.command("register")
    def registry_register(
        model: Annotated[str, typer.Argument(help="Model name.")],
        path: Annotated[Path, typer.Argument(help="A .safetensors state dict.", exists=True, dir_okay=False)],
        parent: Annotated[int | None, typer.Option(help="Parent version number.")] = None,
        lineage: Annotated[
            str, typer.Option(help='JSON, e.g. \'{"round": 12, "deploy_recipe": "int8"}\'.')
        ] = "{}",
        cohort: Annotated[list[str] | None, typer.Option(help="Contributing cohort (repeatable).")] = None,
        data_source: Annotated[list[str] | None, typer.Option(help="Data source (repeatable).")] = None,
        exclude_cohort: Annotated[
            list[str] | None, typer.Option(help="Cohort certified absent (repeatable).")
        ] = None,
        home: Home = None,
    ) -> None:
        """Register a model version from a safetensors file (signed, immutable)."""
        from safetensors.torch import load_file

        from deltaplane.registry import Governance, Registry

        with _errors():
            try:
                lin = json.loads(lineage)
            except ValueError as exc:
                raise ConfigError(f"--lineage is not valid JSON: {exc}") from None
            gov = Governance(tuple(data_source or ()), tuple(cohort or ()), tuple(exclude_cohort or ()))
            art = Registry(_home(home)).register_model(
                model, load_file(str(path)), parent=parent, lineage=lin, governance=gov
            )
        console.print(f"registered [bold]{art.ref}[/bold] sha256 {art.sha256[:16]}… ({art.size} bytes)")

    @reg_app.command("list")
    def registry_list(
        model: Annotated[str | None, typer.Argument(help="Only this model.")] = None, home: Home = None
    ) -> None:
        """List versions with their tags, lineage and sizes."""
        from deltaplane.registry import Registry

        with _errors():
            reg = Registry(_home(home))
            table = Table("ref", "kind", "parent", "size", "tags", "lineage", "cohorts")
            for a in reg.versions(model):
                tags = ",".join(
                    t for t, n in reg.tags(a.model).items() if n == a.number and a.kind == "model"
                )
                table.add_row(
                    a.ref,
                    a.kind if a.kind == "model" else f"delta {a.base}->{a.target}",
                    str(a.parent or ""),
                    f"{a.size:,}",
                    tags,
                    escape(json.dumps(a.lineage)),
                    ",".join(a.governance.cohorts),
                )
        console.print(table)

    @reg_app.command("show")
    def registry_show(
        ref: Annotated[str, typer.Argument(help="model@N or model:tag")], home: Home = None
    ) -> None:
        """Print a version's metadata, evaluations and model card as JSON."""
        from deltaplane.registry import Registry

        with _errors():
            reg = Registry(_home(home))
            art = reg.resolve(ref)
            doc = art.to_dict() | {
                "evaluations": reg.evaluations(art),
                "card": reg.card(art),
                "governance_problems": reg.governance_problems(art),
            }
        console.print_json(json.dumps(doc, default=str))

    @reg_app.command("verify")
    def registry_verify(
        home: Home = None,
        no_signatures: Annotated[bool, typer.Option("--no-signatures", help="Only check hashes.")] = False,
    ) -> None:
        """Integrity check: every blob's hash, every row's blob, every signature. Exit 1 on problems."""
        from deltaplane.errors import IntegrityError
        from deltaplane.registry import Registry

        with _errors():
            try:
                rep = Registry(_home(home)).verify(signatures=not no_signatures)
            except IntegrityError as exc:  # the database itself is unreadable: a finding, not a crash
                err_console.print(f"[red]problem:[/red] {escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(code=1) from None
        console.print(
            f"{rep.rows_checked} versions, {rep.blobs_checked} blobs checked; "
            f"{len(rep.orphans)} orphan blobs, {len(rep.temp_files)} temp files (safe to gc)"
        )
        for p in rep.problems:
            err_console.print(f"[red]problem:[/red] {escape(p)}", soft_wrap=True)
        if not rep.ok:
            raise typer.Exit(code=1)
        console.print("[green]registry OK[/green]")

    @reg_app.command("tag")
    def registry_tag(
        ref: Annotated[str, typer.Argument(help="model@N")],
        tag: Annotated[str, typer.Argument(help="e.g. staging, production.eu")],
        home: Home = None,
    ) -> None:
        """Point a tag at a version without the gate (refused for 'production': use promote)."""
        from deltaplane.registry import Registry

        with _errors():
            if tag == "production":
                raise ConfigError("'production' only moves through `deltaplane registry promote` (the gate)")
            reg = Registry(_home(home))
            art = reg.resolve(ref)
            reg.set_tag(art.model, tag, art.number, reason="cli tag")
        console.print(f"{art.model}:{tag} -> {art.number}")

    @reg_app.command("promote")
    def registry_promote(
        ref: Annotated[str, typer.Argument(help="model@N")],
        evaluator: Annotated[str, typer.Option(help="package.module:function(state) -> metrics.")],
        to: Annotated[str, typer.Option("--to", help="Tag to move.")] = "production",
        tolerance: Annotated[
            list[str] | None,
            typer.Option(
                help="metric=allowed_drop (repeatable) [default: accuracy=0.01, ood_accuracy=0.02]."
            ),
        ] = None,
        home: Home = None,
    ) -> None:
        """Evaluate VERSION and the current holder of the tag; promote only if nothing regressed."""
        from deltaplane.registry import Registry, promote

        with _errors():
            res = promote(
                Registry(_home(home)),
                ref,
                to=to,
                evaluator=load_evaluator(evaluator),
                tolerance=_tolerance(tolerance),
                evaluator_name=evaluator,
            )
        console.print(escape(res.summary()))

    @reg_app.command("rollback")
    def registry_rollback(
        model: Annotated[str, typer.Argument(help="Model name.")],
        tag: Annotated[str, typer.Option(help="Tag to roll back.")] = "production",
        home: Home = None,
    ) -> None:
        """Point the tag back at its previous version (byte-identical weights)."""
        from deltaplane.registry import Registry, rollback

        with _errors():
            art = rollback(Registry(_home(home)), model, tag=tag)
        console.print(f"{model}:{tag} -> {art.number} (sha256 {art.sha256[:16]}…)")

    @reg_app.command("withdraw")
    def registry_withdraw(
        cohort_arg: Annotated[
            str | None, typer.Argument(metavar="[COHORT]", help="Cohort (or --cohort).")
        ] = None,
        cohort: Annotated[str | None, typer.Option("--cohort", help="Cohort that withdrew consent.")] = None,
        reason: Annotated[str, typer.Option(help="Why (kept in the record).")] = "",
        home: Home = None,
    ) -> None:
        """Record a consent withdrawal: list every affected version (through lineage), block promoting and
        serving them, and name the version a rebuild without the cohort starts from."""
        from deltaplane.registry import Registry

        with _errors():
            name = cohort or cohort_arg
            if not name:
                raise ConfigError("name the cohort: `deltaplane registry withdraw --cohort eu`")
            reg = Registry(_home(home))
            affected = reg.withdraw_cohort(name, reason=reason)
            models = [a for a in affected if a.kind == "model"]
            console.print(
                f"cohort {name!r} withdrawn; affected versions: {', '.join(a.ref for a in models) or 'none'}"
            )
            for m in sorted({a.model for a in models}):
                head = max(a.number for a in reg.versions(m, kind="model"))
                base = reg.last_unaffected(m, head)
                where = base.ref if base else "none (register a new base)"
                console.print(
                    f"  {m}: rebuild from {where} (service: POST /admin/models/{m}/rebuild); "
                    "affected versions can no longer be promoted or served"
                )

    @reg_app.command("gc")
    def registry_gc(
        min_age: Annotated[
            float, typer.Option(help="Only remove files older than this many seconds.")
        ] = 3600.0,
        home: Home = None,
    ) -> None:
        """Remove orphan blobs and temp files left by interrupted writes."""
        from deltaplane.registry import Registry

        with _errors():
            n = Registry(_home(home)).gc(min_age_s=min_age)
        console.print(f"removed {n} files")

    @reg_app.command("torture")
    def registry_torture(
        kills: Annotated[int, typer.Option(help="How many times to SIGKILL the writer.")] = 50,
        seed: Annotated[int, typer.Option(help="Seed of the kill times.")] = 0,
        home: Annotated[Path, typer.Option("--home", help="A scratch registry folder (created).")] = Path(
            "runs/torture"
        ),
    ) -> None:
        """Crash-safety check of this machine's filesystem: kill a writer at random points, verify after each."""
        from deltaplane.registry.torture import torture

        with _errors():
            rep = torture(home, kills=kills, seed=seed)
        console.print(
            f"{rep.kills} kills, {rep.committed} committed versions, {len(rep.problems)} problems, "
            f"{rep.seconds:.1f}s"
        )
        for p in rep.problems[:20]:
            err_console.print(f"[red]problem:[/red] {escape(p)}", soft_wrap=True)
        if not rep.ok:
            raise typer.Exit(code=1)

    @app.command("serve")
    def serve_cmd(
        home: Home = None,
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
        admin_token: Annotated[
            str | None,
            typer.Option(envvar="DELTAPLANE_ADMIN_TOKEN", help="Admin bearer token (>= 16 chars)."),
        ] = None,
        device_secret: Annotated[
            str | None, typer.Option(envvar="DELTAPLANE_DEVICE_SECRET", help="HMAC key for device tokens.")
        ] = None,
        max_upload_bytes: Annotated[int, typer.Option(help="Upload size limit.")] = 8 << 20,
        rate: Annotated[float, typer.Option(help="Per-device requests per second.")] = 20.0,
        burst: Annotated[int, typer.Option(help="Per-device burst.")] = 40,
        evaluator: Annotated[
            str | None, typer.Option(help="package.module:function for promotion gates.")
        ] = None,
        downlink_codec: Annotated[
            str, typer.Option(help="Codec of the round-to-round deltas the service publishes.")
        ] = "topk(0.05) | quant(bits=8)",
        max_json_bytes: Annotated[int, typer.Option(help="Limit of every non-upload request body.")] = 2
        << 20,
        tls_cert: Annotated[
            Path | None, typer.Option(help="Server certificate (PEM) for HTTPS (`deltaplane keys tls`).")
        ] = None,
        tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
        tls_client_ca: Annotated[
            Path | None, typer.Option(help="Require device certificates signed by this CA (mutual TLS).")
        ] = None,
        insecure_http: Annotated[
            bool,
            typer.Option(
                "--insecure-http", help="Allow plain HTTP on a non-loopback interface (behind a TLS proxy)."
            ),
        ] = False,
    ) -> None:
        """Start the device-facing HTTP(S) service (OpenAPI docs at /docs)."""
        import secrets

        from deltaplane.serve import ServiceConfig, create_app, serve
        from deltaplane.serve.tls import server_ssl_options

        with _errors():
            token = admin_token or secrets.token_urlsafe(24)
            if admin_token is None:
                err_console.print(f"admin token (set DELTAPLANE_ADMIN_TOKEN to choose one): {token}")
            config = ServiceConfig(
                home=str(_home(home)),
                admin_token=token,
                device_secret=device_secret or os.environ.get("DELTAPLANE_DEVICE_SECRET", ""),
                max_upload_bytes=max_upload_bytes,
                rate=rate,
                burst=burst,
                downlink_codec=downlink_codec,
                max_json_bytes=max_json_bytes,
            )
            if (tls_cert is None) != (tls_key is None):
                raise ConfigError("--tls-cert and --tls-key go together")
            if tls_client_ca is not None and tls_cert is None:
                raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
            ssl_options = (
                server_ssl_options(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None
            )
            if ssl_options is None and host not in ("127.0.0.1", "::1", "localhost") and not insecure_http:
                raise ConfigError(
                    f"refusing plain HTTP on {host}: pass --tls-cert/--tls-key (make them with "
                    "`deltaplane keys tls --host NAME`), or --insecure-http behind a TLS-terminating proxy"
                )
            app_ = create_app(config, evaluator=load_evaluator(evaluator) if evaluator else None)
        serve(app_, host=host, port=port, ssl_options=ssl_options)
