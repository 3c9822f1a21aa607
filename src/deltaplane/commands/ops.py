"""``deltaplane keys|registry|serve``: signing keys, the model registry, and the device-facing service.

Every command takes ``--home`` (default ``$DELTAPLANE_HOME`` or ``~/.deltaplane``). Library errors end the
command with a one-line red message and exit code 2; ``registry verify`` exits 1 when it finds problems.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from deltaplane.choices import AGGREGATORS
from deltaplane.commands import (
    DEFAULT_THREADS,
    AddDevices,
    HeldRevocations,
    Threads,
    ValidDays,
    check_threads,
    console,
    cpu_threads,
    err_console,
    error_console,
    finite_number,
    fit_table,
    fleet_size,
    working_dir_on_path,
)
from deltaplane.commands import clean_errors as _errors
from deltaplane.commands.fleet import (
    Ca,
    ClientCert,
    ClientKey,
    ServiceSpki,
    admin_client,
    revoke_device_tokens,
    upload_revocations,
)
from deltaplane.errors import ConfigError
from deltaplane.textfile import KEY_LIMIT, MANIFEST_LIMIT, read_bounded_bytes, read_bounded_text
from deltaplane.wording import count

#: ``keys revoke --valid-days``: the default and largest validity of a revocation list, as
#: :mod:`deltaplane.aggregation.secagg.revocation` has them (not imported: it loads the whole SecAgg package, 1.5 s
#: of every CLI start); tests/commands/test_keys_revoke.py checks they agree
REVOCATION_VALID_DAYS, REVOCATION_MAX_VALID_DAYS = 7, 90

__all__ = ["load_evaluator", "register"]


Home = Annotated[
    Path | None,
    typer.Option("--home", envvar="DELTAPLANE_HOME", help="Registry folder.", show_default="~/.deltaplane"),
]


#: HTTPS for ``serve`` and ``ui`` (see :func:`_listen_ssl`).
TlsCert = Annotated[
    Path | None,
    typer.Option(
        help="Server certificate (PEM) for HTTPS (`deltaplane keys tls`).",
        show_default="none: plain HTTP, loopback only",
    ),
]
TlsKey = Annotated[Path | None, typer.Option(help="Its private key (PEM).", show_default="none")]
InsecureHttp = Annotated[
    bool,
    typer.Option(
        "--insecure-http", help="Allow plain HTTP on a non-loopback interface (behind a TLS proxy)."
    ),
]


#: How long a dashboard sign-in lasts unused, and at most (``ui`` and ``serve`` alike; see docs/dashboard.md).
SessionIdleMinutes = Annotated[
    float,
    typer.Option(
        callback=finite_number, help="A dashboard sign-in unused this long ends (minutes, at least 1)."
    ),
]
SessionMaxHours = Annotated[
    float,
    typer.Option(
        callback=finite_number,
        help="A dashboard sign-in ends this long after it began, however busy (hours).",
    ),
]

#: A TCP port to listen on (uvicorn takes 70000 without a word and binds another, or none for -1).
Port = Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")]

Trusted = Annotated[
    Path | None,
    typer.Option(
        "--trusted",
        help="Trust only these public keys (a file of base64 keys, one a line, or a folder of *.pub), "
        "kept outside HOME; default $DELTAPLANE_TRUSTED_KEYS, else HOME/keys.",
    ),
]


def _pin(trusted: Path | None) -> Path | str | None:
    """The trusted keys to check signatures against: ``--trusted``, else ``$DELTAPLANE_TRUSTED_KEYS``, else None
    (the keys inside the home)."""
    from deltaplane.registry.signing import TRUSTED_KEYS_ENV

    return trusted or os.environ.get(TRUSTED_KEYS_ENV) or None


JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout instead of a table.")]


def _writable(folder: Path, option: str) -> None:
    """:class:`ConfigError` (exit 2) before any work if ``folder`` cannot be a folder this command writes into:
    a file, a path under a file, no write permission (they were raw ``NotADirectoryError`` tracebacks)."""
    from deltaplane.deploy.publish import check_writable_dir

    check_writable_dir(folder, hint=f"give {option} a folder path")


def human_time(ts: float) -> str:
    """A timestamp as local time people read (``2026-12-02 09:15:03``), not seconds since 1970."""
    import datetime as dt

    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _record_label(record: str) -> str:
    """What `registry show` appends to a card or evaluation row that is not signed in the state log (rich markup)."""
    return {
        "signed": "",
        "legacy": " [yellow](unsigned: written before rows were signed; bound as found since)[/yellow]",
        "unsigned": " [yellow](unsigned: written before rows were signed; not verified)[/yellow]",
    }[record]


def _home(home: Path | None) -> Path:
    from deltaplane.registry import default_home

    return home if home is not None else default_home()


def _listen_ssl(
    host: str, tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None, insecure_http: bool
) -> dict[str, Any] | None:
    """uvicorn's TLS options for ``serve`` and ``ui`` (None: plain HTTP), refusing plain HTTP off loopback.

    Both put the admin sign-in form and its session cookie on the wire: over plain HTTP on a network interface
    anyone on the path reads the token, so that needs TLS here or an explicit ``--insecure-http`` (a
    TLS-terminating proxy in front).
    """
    from deltaplane.serve.tls import server_ssl_options

    if not host.strip():
        # asyncio reads an empty host as every interface: say so rather than print "plain HTTP on :"
        raise ConfigError(
            "--host is empty; give the address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 / :: "
            "(every interface)"
        )
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    ssl_options = server_ssl_options(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None
    if ssl_options is None and host not in ("127.0.0.1", "::1", "localhost") and not insecure_http:
        raise ConfigError(
            f"refusing plain HTTP on {host}: pass --tls-cert/--tls-key (make them with "
            "`deltaplane keys tls --host NAME`), or --insecure-http behind a TLS-terminating proxy"
        )
    return ssl_options


def _no_json_constant(name: str) -> Any:
    """``json.loads``' hook for NaN, Infinity and -Infinity: Python's extensions, not JSON; ``registry list
    --json`` would print them back and break strict parsers."""
    raise ValueError(f"{name} is not a JSON number (record it as a string)")


def _finite_json_float(text: str) -> float:
    """``json.loads``' float parser, refusing a number beyond the float range (1e999 would be stored as
    Infinity, which is not JSON)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the float range (record it as a string)")
    return value


def _deploy_link(
    reg: Any, model: str, lineage: dict[str, Any], given: dict[str, Any], parent: int | None
) -> tuple[int | None, list[Any], str]:
    """The parent and sources ``registry register`` gives a deploy artifact from what its manifest names, and
    a line saying so: ``(parent, sources, line)``.

    A deploy manifest records ``source_sha256``, the weights file it compressed; the registry version holding
    them (:meth:`~deltaplane.registry.Registry.deployed_from`, signature checked) becomes the parent when it is
    a version of ``model`` (so the artifact also inherits its tokenizer), else a source (its governance flows
    down). A ``--parent`` given is kept, with a note when it does not hold those weights; a ``--lineage`` with
    its own ``sources`` is not overridden. Other inputs (no manifest, a run folder) are left as given."""
    deploy = lineage.get("deploy")
    source = deploy.get("source_sha256") if isinstance(deploy, dict) else None
    if not isinstance(source, str):
        return parent, [], ""
    held = f"the weights it was deployed from (SHA-256 {source[:16]}…)"
    if parent is not None:
        named = reg.get(model, parent)
        named_source = named.lineage.get("source")
        if source in (named.sha256, named_source.get("sha256") if isinstance(named_source, dict) else None):
            return parent, [], ""
        return (
            parent,
            [],
            f"note: --parent {named.ref} does not hold {held}; registered with the parent you named",
        )
    found = reg.deployed_from(source, model=model)
    if found is None:
        return (
            None,
            [],
            (
                f"note: no registered version holds {held}; name it with --parent or --lineage to link this version "
                "to the model it was made from"
            ),
        )
    if found.model == model:
        return found.number, [], f"parent {found.ref}: it holds {held}"
    if "sources" in given:
        return None, [], f"note: {found.ref} holds {held}; not linked, as --lineage names its own sources"
    return None, [found], f"source {found.ref}: it holds {held}"


def _run_output(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The model file and the run record of a ``deltaplane run`` output folder."""
    model, meta = folder / "model.safetensors", folder / "model.json"
    if not model.is_file() or not meta.is_file():
        raise ConfigError(
            f"{folder} is not a `deltaplane run` output: expected model.safetensors and model.json in it"
        )
    text = read_bounded_text(meta, limit=MANIFEST_LIMIT, what="run record")
    try:
        run = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{meta} is not valid JSON: {exc}") from None
    if not isinstance(run, dict) or run.get("kind") != "deltaplane-run":
        raise ConfigError(f"{meta} is not a run record (kind must be 'deltaplane-run')")
    from deltaplane.report.writer import json_safe

    # a record written before run records were strict JSON may hold NaN metrics: kept as null in the lineage
    return model, json_safe({k: run.get(k) for k in ("run", "task", "config", "final", "total_uplink_bytes")})


def load_evaluator(spec: str) -> Any:
    """Import ``package.module:callable`` or ``path/to/file.py:callable``; it maps a state dict to metrics.

    A module is looked up in the current working directory too (as ``python -m`` would), so an evaluator
    written next to the model works without ``PYTHONPATH=.``.
    """
    import sys

    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ConfigError(
            f"evaluator must be 'package.module:function' or 'path/to/file.py:function'. Found {spec!r}"
        )
    try:
        if module.endswith(".py") or "/" in module or os.sep in module:
            from deltaplane.deploy.checkpoint import import_file

            mod = import_file(
                Path(module), "evaluator"
            )  # its folder on sys.path: it may import its neighbours
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except (ImportError, AttributeError, SyntaxError) as exc:
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
    keys = typer.Typer(
        help="Ed25519 signing keys (init), the SecAgg enrollment authority and device identities (enrollment, "
        "identity, certify, revoke), and TLS certificates for serve (tls).",
        no_args_is_help=True,
    )
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

        with _errors(OSError):
            _writable(_home(home), "--home")
            signer = init_keys(_home(home), overwrite=force)
        console.print(
            f"signing key [bold]{signer.key_id}[/bold] written to {escape(str(_home(home) / 'keys'))}",
            soft_wrap=True,
        )

    @keys.command("enrollment")
    def keys_enrollment(
        out: Annotated[
            Path,
            typer.Option("--out", help="Folder for the authority's key pair: keep it off the service host."),
        ],
    ) -> None:
        """Create the fleet's enrollment authority (Ed25519): `fleet enroll --authority-key` certifies each device's
        SecAgg identity key with it; devices trust its .pub. Not the registry's signing key, which the service
        holds: a service that could certify keys could substitute them (docs/security.md)."""
        from deltaplane.aggregation.secagg.identity import EnrollmentAuthority
        from deltaplane.registry.signing import write_secret_file
        from deltaplane.textfile import atomic_write_bytes

        with _errors(OSError):
            key, pub = out / "enrollment.ed25519.pem", out / "enrollment.ed25519.pub"
            if key.exists() or pub.exists():
                raise ConfigError(
                    f"{key} already exists; every device certificate it issued would stop verifying: keep it, "
                    "or remove it yourself"
                )
            _writable(out, "--out")
            authority = EnrollmentAuthority.generate()
            write_secret_file(key, authority.to_pem())
            atomic_write_bytes(pub, authority.public_text().encode() + b"\n")
        console.print(
            escape(
                f"enrollment authority {authority.id.hex()}: {key} (secret) + {pub} (give this to devices)"
            ),
            soft_wrap=True,
        )

    @keys.command("identity")
    def keys_identity(
        device: Annotated[
            int, typer.Option("--device", min=0, help="This device's partition id: it asks to be device-I.")
        ],
        out: Annotated[Path, typer.Option("--out", help="Folder on the device for its identity key.")],
        cohort: Annotated[str, typer.Option(help="Cohort the device asks to be certified in.")] = "fleet",
        force: Annotated[bool, typer.Option("--force", help="Replace an existing identity key.")] = False,
    ) -> None:
        """On the device: make its SecAgg identity key, OUT/device-I.identity.pem (0600), and OUT/device-I.request,
        the self-signed request to send the operator (`keys certify --request`); the key never leaves the
        device (docs/security.md)."""
        from deltaplane.aggregation.secagg.enrollment import (
            MAX_REQUEST_PARTITION,
            device_id,
            identity_files,
            new_identity_request,
            request_file,
            write_identity_request,
        )

        with _errors(OSError):
            if device > MAX_REQUEST_PARTITION:  # its request would be refused by `keys certify --request`
                raise ConfigError(f"--device is a partition id of at most 18 digits. Found {device}")
            name = device_id(device)
            key_pem, request = new_identity_request(name, cohort=cohort)
            held = next(
                (p for p in (identity_files(out, name)[0], request_file(out, name)) if os.path.lexists(p)),
                None,
            )
            if held is not None and not force:
                raise ConfigError(
                    f"{held} already exists; pass --force to replace it (its certificate, if any, then stops "
                    "matching the key), or choose another --out"
                )
            _writable(out, "--out")
            key, req = write_identity_request(out, key_pem, request, replace=force)
        console.print(
            escape(
                f"{name}: identity key {key} (secret, stays here) + {req}: send it to the operator for "
                f"`deltaplane keys certify --request {req.name}` and put the "
                f"{identity_files(out, name)[1].name} it returns next to the key"
            ),
            soft_wrap=True,
        )

    @keys.command("certify")
    def keys_certify(
        authority_key: Annotated[
            Path,
            typer.Option(
                "--authority-key", help="The enrollment authority's private key (keys enrollment wrote it)."
            ),
        ],
        out: Annotated[Path, typer.Option("--out", help="Folder for the devices' identity files.")],
        devices: Annotated[
            int | None,
            typer.Option(
                "--devices",
                min=1,
                callback=fleet_size,
                help="Certify device-0 … device-(N-1).",
                show_default="none",
            ),
        ] = None,
        device: Annotated[
            list[int] | None,
            typer.Option(
                "--device", min=0, help="Certify device-I (a partition id; repeatable).", show_default="none"
            ),
        ] = None,
        request: Annotated[
            list[Path] | None,
            typer.Option(
                "--request",
                help="Certify the key a device made (`keys identity` wrote its device-I.request; repeatable): "
                "writes its certificate only.",
                show_default="none",
            ),
        ] = None,
        cohort: Annotated[
            str | None,
            typer.Option(
                help="Cohort the certificates name (rounds take one); with --request, the one each request must "
                "ask for.",
                show_default="fleet, or the requests'",
            ),
        ] = None,
        valid_days: ValidDays = 365.0,
        node_dir: Annotated[
            Path | None,
            typer.Option(
                "--node-dir",
                help="Folder the files lie in on each node, for the printed --node-config.",
                show_default="OUT",
            ),
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace existing identity files.")] = False,
        reissue_ids: Annotated[
            bool,
            typer.Option(
                "--reissue-ids",
                help="Give a new key to ids OUT records as issued or revoked (enrollment.ledger, or up to an "
                "earlier release's enrollment.issued mark; refused otherwise: an id never gets a second key "
                "silently). Only for an id whose earlier key is known destroyed, or one an earlier release's "
                "folder counts but never issued: an earlier key stays valid until its certificate expires, and "
                "revoking it would revoke the id.",
            ),
        ] = False,
        add: AddDevices = None,
        revocations: HeldRevocations = None,
    ) -> None:
        """Certify SecAgg identities offline (no service): OUT/device-I.identity.pem (0600) and OUT/device-I.cert,
        the files `fleet enroll --authority-key` writes, and OUT/enrollment.ed25519.pub; prints each Flower
        node's --node-config. With --request, certify keys the devices made themselves (`keys identity`): only
        OUT/device-I.cert and the .pub are written, never a private key."""
        import shlex

        from deltaplane.aggregation.secagg.enrollment import (
            AUTHORITY_PUBLIC_NAME,
            ISSUED_MARK_NAME,
            LEDGER_NAME,
            certify,
            certify_requests,
            check_held_key,
            check_not_issued,
            check_not_reserved,
            check_not_revoked,
            device_id,
            enrollment_lock,
            fleet_cohort,
            identity_files,
            load_authority,
            next_device_ids,
            node_config_arg,
            read_held_revocations,
            read_request,
            record_issued,
            renews_held_key,
            write_certificate,
            write_identity,
            writing_all_or_nothing,
        )
        from deltaplane.textfile import atomic_write_bytes

        with _errors(OSError):
            if sum((devices is not None, bool(device), bool(request), add is not None)) != 1:
                raise ConfigError(
                    "give --devices N (device-0 … device-(N-1)), --device I (repeatable), --add K (the next free "
                    "ids) or --request FILE (repeatable), not both"
                )
            requests = [read_request(p) for p in request or []]
            for path, r in zip(request or [], requests, strict=True):
                if cohort is not None and r.cohort != cohort:
                    raise ConfigError(f"{path} asks for cohort {r.cohort!r}, not --cohort {cohort!r}")
            if requests:
                names = [r.device_id for r in requests]
                twice = next((n for n in names if names.count(n) > 1), None)
                if twice is not None:
                    raise ConfigError(f"two --request files ask for {twice}; give one per device")
            authority = load_authority(authority_key)
            listed = None if revocations is None else read_held_revocations(revocations, authority)
            if add is None and not requests:
                names = [device_id(i) for i in (dict.fromkeys(device) if device else range(devices or 0))]
            public = (authority.public_text() + "\n").encode()
            pub = out / AUTHORITY_PUBLIC_NAME
            _writable(out, "--out")
            # the choice of ids, every check of OUT and the writes under one lock on OUT: concurrent runs take
            # turns, so two --add runs never take the same ids nor leave the mark below what either issued
            with enrollment_lock(out):
                if add is not None:
                    names = next_device_ids(
                        out, add, revoked=[d for d, _ in listed.revoked] if listed else ()
                    )
                    cohort = fleet_cohort(out, cohort)
                # a revoked id, or a request of a revoked key whatever id it asks for: said first, since no
                # other fix (removing a stale key, --force) would make it certifiable
                if listed is not None and revocations is not None:  # listed is read from revocations
                    check_not_revoked(
                        names, listed, revocations, requests=list(zip(request or [], requests, strict=True))
                    )
                # the key OUT holds for each request's device read under the lock, as every write there is: a
                # key written after the check would sit beside a certificate for another key
                for path, r in zip(request or [], requests, strict=True):
                    check_held_key(out, r, path)  # --force or not: it replaces certificates, never a key
                check_not_reserved(out, names)  # a fleet enroll run is issuing them: --reissue-ids or not
                if not force:
                    made = [identity_files(out, n)[1:] if requests else identity_files(out, n) for n in names]
                    held = next((p for paths in made for p in paths if os.path.lexists(p)), None)
                    if held is not None:
                        raise ConfigError(
                            f"{held} already exists; pass --force to replace it (a request's certificate for the "
                            "key the device holds is renewed; a new key for an issued id also needs "
                            "--reissue-ids), or enrol a new device with --add, or choose another --out"
                        )
                    held_pub = (
                        read_bounded_bytes(pub, limit=KEY_LIMIT, what="enrollment authority public key")
                        if os.path.lexists(pub)
                        else public
                    )
                    if held_pub != public:
                        raise ConfigError(
                            f"{pub} is another enrollment authority's key, which the identities in {out} were "
                            "certified by; choose another --out, or --force to replace it"
                        )
                if not reissue_ids:  # a renewal of the key OUT holds for the id is no second key
                    renewed = {r.device_id for r in requests if renews_held_key(out, r)}
                    check_not_issued(out, [n for n in names if n not in renewed], override="--reissue-ids")
                # each node's --node-config before any file is written: a path it cannot carry is a usage error
                # that leaves nothing behind (it was a traceback after the files were written)
                on_node = out.resolve() if node_dir is None else node_dir
                args = [
                    node_config_arg(*(on_node / p.name for p in (*identity_files(out, n), pub)))
                    for n in names
                ]
                certs = certify_requests(authority, requests, valid_days=valid_days) if requests else []
                identities = (
                    []
                    if requests
                    else certify(
                        authority, names, cohort="fleet" if cohort is None else cohort, valid_days=valid_days
                    )
                )
                # all or nothing: a failure or ctrl-C part-way puts back every file as it was, the ledger, the
                # mark and keys a --force run replaced included; the ids are recorded first, so a run killed
                # outright leaves no written id out of the ledger
                targets = [
                    out / LEDGER_NAME,
                    out / ISSUED_MARK_NAME,
                    pub,
                    *(p for n in names for p in identity_files(out, n)),
                ]
                with writing_all_or_nothing(targets):
                    record_issued(out, names)
                    for c in certs:
                        write_certificate(out, c, replace=force)
                    for i in identities:
                        write_identity(out, i, replace=force)
                    atomic_write_bytes(pub, public)
        console.print(
            escape(
                f"{count(len(names), 'identity', 'identities')} certified by enrollment authority {authority.id.hex()} in {out}/"
            ),
            soft_wrap=True,
        )
        for name, arg in zip(names, args, strict=True):
            console.print(
                escape(f"{name}: flower-supernode --node-config {shlex.quote(arg)}"), soft_wrap=True
            )
        # a request's key stays on its device: without --node-dir the lines above name it under OUT, where it
        # lies only if node and operator share the folder; say so rather than print a path to no file
        keyless = [
            n for n in names if requests and node_dir is None and not identity_files(out, n)[0].exists()
        ]
        if keyless:
            console.print(
                escape(
                    f"note: {', '.join(keyless)}: no identity key in {out}/ (it stays on the device), so the "
                    "lines above name one that is not there; give --node-dir DIR, the folder on the node that "
                    "holds its key (keys identity --out) and the certificate and .pub you send it"
                ),
                soft_wrap=True,
            )

    @keys.command("revoke")
    def keys_revoke(
        authority_key: Annotated[
            Path,
            typer.Option(
                "--authority-key", help="The enrollment authority's private key (keys enrollment wrote it)."
            ),
        ],
        out: Annotated[
            Path,
            typer.Option("--out", help="The revocation list: appended to if it exists, else created."),
        ],
        device: Annotated[
            list[int] | None,
            typer.Option(
                "--device",
                min=0,
                help="Revoke device-I (a partition id; repeatable). None: re-issue the list with a new next update.",
                show_default="none",
            ),
        ] = None,
        cohort: Annotated[
            str, typer.Option(help="Cohort of the revoked ids whose certificate is not at hand.")
        ] = "fleet",
        certificate: Annotated[
            list[Path] | None,
            typer.Option(
                "--certificate",
                dir_okay=False,
                help="Revoke this device certificate (a device-I.cert; repeatable): its device id in its cohort "
                "and the identity key it binds, refused then under any id.",
                show_default="none",
            ),
        ] = None,
        enrolled: Annotated[
            Path | None,
            typer.Option(
                "--enrolled",
                file_okay=False,
                help="The enrollment folder (fleet enroll / keys certify --out) to find each --device's "
                "device-I.cert in, so its key is revoked too; the revoked ids are recorded there "
                "(enrollment.ledger), so no run enrols them again.",
                show_default="none",
            ),
        ] = None,
        carry: Annotated[
            Path | None,
            typer.Option(
                "--carry",
                dir_okay=False,
                help="A previous enrollment authority's list (changing the authority): its revoked ids and keys "
                "are revoked in OUT too, so a leaked key stays out under the new authority.",
                show_default="none",
            ),
        ] = None,
        valid_days: Annotated[
            int,
            typer.Option(
                "--valid-days",
                min=1,
                max=REVOCATION_MAX_VALID_DAYS,
                help="Days until the list's next update: past it (plus 5 minutes of clock skew) devices and the "
                "service refuse authenticated rounds until a newer list arrives, which bounds how long a newer "
                "list can be withheld from them. Re-issue it before then.",
            ),
        ] = REVOCATION_VALID_DAYS,
        upload: Annotated[
            str | None,
            typer.Option(
                "--upload",
                metavar="URL",
                help="Then upload OUT to the service at URL (POST /admin/secagg/revocations; admin token from "
                "$DELTAPLANE_ADMIN_TOKEN) and print its answer, then revoke the service tokens of the ids revoked "
                "(POST /admin/devices/ID/revoke). OUT is written first and kept if the upload "
                "fails: exit 3 when the service refuses the list (409 older, 422 forged or stale), 1 when it "
                "cannot be reached or a token revocation fails (the list stays uploaded).",
                show_default="none",
            ),
        ] = None,
        ca: Ca = None,
        tls_cert: ClientCert = None,
        tls_key: ClientKey = None,
        service_spki: ServiceSpki = None,
    ) -> None:
        """Revoke device identities before their certificates expire (a leaked identity key): add device-I in
        COHORT, and the identity key of each certificate given (--certificate, or device-I.cert found in
        --enrolled DIR), to the authority's signed revocation list OUT, numbered one past the list there and current for
        --valid-days (atomic write; concurrent runs on one OUT take turns on the lock file OUT.lock, so each
        numbers its list one past the other's); without --device, re-issue OUT as it is with a new next update
        (a version-1 list, which had none, is re-issued this way). Give OUT to the service (--upload URL
        posts it to /admin/secagg/revocations once written, then revokes the revoked ids' service tokens; or serve
        --secagg-revocations), from which fleet devices fetch it before each
        round, or to each device (fleet device --revocations, Flower's secagg-revocations); devices refuse rounds
        that seat a revoked device (docs/security.md)."""
        import time

        from deltaplane.aggregation.secagg import SecAggAuthError
        from deltaplane.aggregation.secagg.enrollment import (
            check_ledger_room,
            device_id,
            enrollment_lock,
            load_authority,
            record_issued,
            revoked_certificates,
        )
        from deltaplane.aggregation.secagg.identity import key_fingerprint
        from deltaplane.aggregation.secagg.revocation import (
            read_server_revocations,
            revoke,
            write_revocations,
        )
        from deltaplane.textfile import exclusive_lock

        with _errors(OSError):
            authority = load_authority(authority_key)
            _writable(out.parent, "--out")
            # --enrolled DIR records the revoked ids in its ledger (record_issued): written after the list
            mark_in = enrolled if enrolled is not None and enrolled.is_dir() and device else None
            if mark_in is not None:
                _writable(mark_in, "--enrolled")
            if upload is None and (ca or tls_cert or tls_key or service_spki):
                raise ConfigError(
                    "--ca, --tls-cert, --tls-key and --service-spki are for --upload URL; give it too"
                )
            # the service's client before the list is written: no admin token, https without --ca, a bad pin...
            # is a usage error that changes nothing; a refused or failed upload after it leaves OUT written
            admin = None if upload is None else admin_client(upload, ca, tls_cert, tls_key, service_spki)
            ids = [device_id(i) for i in dict.fromkeys(device or [])]
            # each certificate at hand (given, or the device's in --enrolled), this authority's: its key is revoked
            certs, uncovered = revoked_certificates(authority, ids, certificate or [], enrolled)
            # the old authority's list, unchecked (the operator's own file; its authority's key may be gone)
            carried = None if carry is None else read_server_revocations(carry, legacy=True)
            # --enrolled DIR's lock around the list's write and the ids' record, its ledger's room checked first:
            # near the ledger's bound the run was refused once the list was written (always this lock first,
            # then OUT.lock: no run takes them the other way round)
            held_dir = enrollment_lock(mark_in) if mark_in is not None else contextlib.nullcontext()
            # the read, the new number and the write under one lock (OUT.lock beside it): two concurrent runs on
            # one OUT would otherwise both number their list one past the same old one, with other contents
            with held_dir, exclusive_lock(out.with_name(out.name + ".lock")):
                if mark_in is not None:
                    check_ledger_room(mark_in, [(i, i) for i in dict.fromkeys(device or [])])
                # the existing list: malformed is a ConfigError naming it; another authority's is revoke()'s
                # ConfigError; one that does not verify under this key is refused here (the operator's words,
                # exit 2); a version-1 list (no next update) is read to be re-issued
                previous = read_server_revocations(out, legacy=True) if os.path.lexists(out) else None
                if previous is not None and previous.authority == authority.id:
                    try:
                        authority.trust().check_revocations(
                            previous.authority, previous.signed_part(), previous.signature
                        )
                    except SecAggAuthError:
                        raise ConfigError(
                            f"{out}: its signature does not verify under this authority key (altered or "
                            "forged); restore the list `keys revoke` wrote, or give another --out"
                        ) from None
                names = [(d, cohort) for d in uncovered] + [(c.device_id, c.cohort) for c in certs]
                names += sorted(carried.revoked) if carried is not None else []
                revocations = revoke(
                    authority,
                    names,
                    issued=int(time.time()),
                    valid_s=valid_days * 86_400,
                    previous=previous,
                    keys=[key_fingerprint(c.identity_public) for c in certs]
                    + sorted(carried.keys if carried is not None else ()),
                )
                write_revocations(out, revocations)
                if (
                    mark_in is not None
                ):  # --add in that folder never hands a revoked id out again, files or not
                    record_issued(mark_in, ids)
        console.print(
            escape(
                f"revocation list number {revocations.sequence} of authority {authority.id.hex()}: "
                f"{count(len(revocations.revoked), 'device')} revoked ({count(len(revocations.keys), 'key')}), current until "
                f"{revocations.next_update} "
                f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(revocations.next_update))}), written to {out}"
            ),
            soft_wrap=True,
        )
        for c in certs:
            fp = key_fingerprint(c.identity_public).hex()[:16]
            console.print(
                escape(f"{c.device_id}: key SHA256:{fp}… revoked under any device id"), soft_wrap=True
            )
        for d in uncovered:
            console.print(
                escape(
                    f"{d}: its id only; its key is not covered (no certificate: give --certificate FILE or "
                    "--enrolled DIR holding its .cert), so the key could be certified again under another id"
                ),
                soft_wrap=True,
            )
        if admin is not None and upload is not None:  # admin is made for upload
            # the ids this run revokes (not --carry's: revoked, with their tokens, under the old authority)
            tokens_of = list(dict.fromkeys([*ids, *(c.device_id for c in certs)]))
            with _errors(OSError):
                answer = upload_revocations(admin, upload, revocations.to_bytes(), out, tokens_of)
            keys = answer.get("revoked_keys")  # absent from a service before key revocation: not guessed
            held = f"list number {answer['sequence']} ({count(answer['revoked'], 'device')} revoked" + (
                ")" if keys is None else f", {count(keys, 'key')})"
            )
            console.print(
                escape(
                    f"uploaded to {upload}: the service now holds {held}"
                    if answer["replaced"]
                    else f"uploaded to {upload}: the service already held {held}, unchanged"
                ),
                soft_wrap=True,
            )
            if tokens_of:
                with _errors(OSError):
                    revoke_device_tokens(admin, upload, tokens_of)
                console.print(
                    escape(
                        f"service tokens of {', '.join(tokens_of)} revoked on {upload} (every token issued "
                        f"to {'it' if len(tokens_of) == 1 else 'them'} so far is refused)"
                    ),
                    soft_wrap=True,
                )

    @keys.command("tls")
    def keys_tls(
        home: Home = None,
        host: Annotated[
            list[str] | None,
            typer.Option(
                "--host",
                help="Server name or IP the certificate is valid for (repeatable).",
                show_default="127.0.0.1 and localhost",
            ),
        ] = None,
        device: Annotated[
            list[str] | None,
            typer.Option(
                "--device", help="Also issue a client certificate (mutual TLS).", show_default="none"
            ),
        ] = None,
        out: Annotated[Path | None, typer.Option(help="Folder [default: HOME/tls].")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing CA.")] = False,
        keep_key: Annotated[
            bool,
            typer.Option(
                "--keep-key",
                help="Renew the server certificate for the key already in server.key (left as it is), so the "
                "server key pin (--service-spki) stays the same and a pinned fleet needs nothing new. Without "
                "it the server gets a new key, and a new pin.",
            ),
        ] = False,
    ) -> None:
        """Create a private CA and a server certificate signed by it (keys 0600); devices trust ca.pem. Run
        again to renew the server certificate (with --keep-key: for the same key, so its pin holds)."""
        from deltaplane.serve.tls import make_tls_bundle

        with _errors(OSError):
            _writable(out or _home(home) / "tls", "--out" if out else "--home")
            b = make_tls_bundle(
                out or _home(home) / "tls",
                hosts=host or ["127.0.0.1", "localhost"],
                devices=device or [],
                overwrite=force,
                keep_key=keep_key,
            )
        # soft_wrap: a path broken across lines (rich wraps at 80 columns when stdout is no terminal) cannot be
        # copied or clicked
        console.print(
            escape(f"CA {b.ca_cert} (give this to devices); server {b.server_cert} + {b.server_key}"),
            soft_wrap=True,
        )
        kept = ", unchanged: the key was kept" if keep_key else ""
        console.print(f"server key pin {b.service_spki} (fleet device --service-spki{kept})", soft_wrap=True)
        for d, (c, k) in b.devices.items():
            console.print(escape(f"device {d}: {c} + {k}"), soft_wrap=True)

    @reg_app.command("init")
    def registry_init(
        home: Home = None,
        no_encrypt: Annotated[
            bool, typer.Option("--no-encrypt", help="Store blobs in plaintext (explicit opt-out).")
        ] = False,
    ) -> None:
        """Create a registry (and a signing key if there is none); blobs are encrypted at rest by default."""
        from deltaplane.registry import Registry

        with _errors(OSError):
            _writable(_home(home), "--home")
            reg = Registry.create(_home(home), encrypt=not no_encrypt)
            at_rest = f"AES-256-GCM, key {reg.keyring.current}" if reg.encrypted else "plaintext (opted out)"
            console.print(
                escape(f"registry ready at {reg.home} (signing key {reg.signer.key_id}; blobs: {at_rest})"),
                soft_wrap=True,
            )

    @reg_app.command("rotate-key")
    def registry_rotate_key(
        home: Home = None,
        key_file: Annotated[
            Path | None, typer.Option(help="New KEK (base64 of 32 bytes) [default: a random one].")
        ] = None,
    ) -> None:
        """Re-wrap every blob's data key with a new key-encryption key; old key files are removed.

        With $DELTAPLANE_KEK (or $DELTAPLANE_KEK_FILE) set, put the new key first there (comma-separated, the
        old keys after it) and run this without --key-file: blobs are re-wrapped to that first key, and the
        output says which old keys to remove from the variable.
        """
        from deltaplane.registry import Registry
        from deltaplane.registry.encryption import parse_key

        with _errors(OSError):  # OSError: a --key-file that cannot be read
            reg = Registry(_home(home))
            from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

            new = (
                parse_key(read_bounded_bytes(key_file, limit=KEY_LIMIT, what="--key-file"), str(key_file))
                if key_file
                else None
            )
            done = reg.rotate_kek(new)
        console.print(f"{count(done.rewrapped, 'blob')} re-wrapped with key {done.current}")
        console.print(escape(done.advice), soft_wrap=True)  # names the key files, by path

    @reg_app.command("register")
    def registry_register(
        model: Annotated[str, typer.Argument(help="Model name.")],
        path: Annotated[
            Path,
            typer.Argument(
                help="A .safetensors state dict, a .dpla/.onnx file, a deploy output folder, a Hugging Face "
                "checkpoint folder, or a `deltaplane run` output folder (model.safetensors + model.json, whose "
                "task, config and final metrics become the lineage).",
                exists=True,
            ),
        ],
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
        """Register a model version (signed, immutable) from a state dict, an artifact, or a run, deploy or
        Hugging Face folder."""
        from deltaplane.deploy.bundle import load_deployable
        from deltaplane.registry import Governance, Registry
        from deltaplane.registry.merged import link_merge_sources, read_merge_sources

        with _errors():
            try:
                lin = json.loads(lineage, parse_constant=_no_json_constant, parse_float=_finite_json_float)
            except ValueError as exc:
                raise ConfigError(f"--lineage is not valid JSON: {exc}") from None
            except RecursionError:
                raise ConfigError("--lineage is nested too deeply to read; flatten it") from None
            if not isinstance(lin, dict):
                raise ConfigError(
                    f"--lineage must be a JSON object, e.g. '{{\"round\": 12}}'. Found {lineage!r:.80}"
                )
            sources = list(data_source or ())
            if path.is_dir() and (path / "model.json").is_file():  # a `deltaplane run` output folder
                path, run = _run_output(path)
                lin = {"run": run, **lin}
                sources = sources or [f"task {run['task']}"]
            gov = Governance(tuple(sources), tuple(cohort or ()), tuple(exclude_cohort or ()))
            src = load_deployable(
                path
            )  # .safetensors, .dpla/.onnx, deploy or HF folder: tensors + provenance
            merge = read_merge_sources(path)  # a `deltaplane merge` output names its inputs' weights
            if merge is not None:
                src.lineage["merge"] = merge
            reg = Registry(_home(home))
            parent, linked, link_note = _deploy_link(reg, model, src.lineage, lin, parent)
            merge_lines: list[str] = []
            if merge is not None:  # the merged versions' cohorts follow (refused where they would be dropped)
                merged_from, merge_lines = link_merge_sources(reg, model, merge, lin, parent)
                linked += [a for a in merged_from if a.ref not in {x.ref for x in linked}]
            art = reg.register_model(
                model,
                src.state,
                parent=parent,
                lineage={**src.lineage, **lin},
                governance=gov,
                sources=linked,
                files=src.files or None,  # none of its own: a version with a parent keeps the parent's
            )
            # a pulled version registered again: say why withdrawals of the original's cohorts will reach it
            twins = [a.ref for a in reg.same_weights(art) if a.model != model or a.number != parent]
            withdrawn = reg.governance_problems(art, verify=True) if merge is not None else []
        console.print(f"registered [bold]{art.ref}[/bold] sha256 {art.sha256[:16]}… ({art.size} bytes)")
        for line in [link_note, *merge_lines]:
            if line:
                err_console.print(escape(line), soft_wrap=True)
        for problem in withdrawn:  # not a note: -q does not silence it (as registry pull's warning)
            error_console.print(
                f"[yellow]warning:[/yellow] {escape(problem)}: it may not be promoted, served or used as a round base",
                soft_wrap=True,
            )
        if twins:
            err_console.print(
                f"note: {escape(art.ref)} holds the same weights as {escape(', '.join(twins))}: it counts as built "
                "from them, so a consent withdrawal of their cohorts reaches it",
                soft_wrap=True,
            )

    @reg_app.command("pull")
    def registry_pull(
        ref: Annotated[str, typer.Argument(help="MODEL, MODEL@VERSION, MODEL@latest or MODEL:TAG.")],
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                "-o",
                help="Folder to write model.safetensors and manifest.json (and config.json and the tokenizer's "
                "files, when registered with them).",
            ),
        ],
        home: Home = None,
    ) -> None:
        """Download a verified model version (hash and signature checked; a MODEL:TAG's tag checked against the
        signed state log) into a folder.

        A version trained on a cohort that withdrew consent is still pulled, with a warning on stderr and the
        cohorts in manifest.json's ``consent.withdrawn_cohorts`` (empty when none)."""
        from deltaplane.registry import Registry, withdrawn_among
        from deltaplane.shards import COMPANION_FILES

        with _errors(OSError):
            _writable(out, "--out")  # before the registry is read: a path under a file, no permission
            reg = Registry(_home(home))
            # a tag is checked against the signed state log, as the service's downloads and the dashboard do: a
            # tag row edited in registry.db is an IntegrityError (exit 1, nothing written), not another version
            art = reg.resolve(ref if ("@" in ref or ":" in ref) else f"{ref}@latest", verify=True)
            if art.kind != "model":
                raise ConfigError(f"{art.ref} is a delta; registry pull needs a model version")
            # the version's own bytes (a safetensors file, hash and signature checked before anything is written),
            # so the pulled model.safetensors hashes to manifest.json's sha256, and a deploy of the folder names
            # this version as its source (registry register links it back)
            weights = reg.read(art)
            # consent is governance, not integrity: a version trained on a cohort that withdrew consent still
            # pulls ("verified" keeps meaning hash and signature), but the user is told and the manifest says so
            # read verified against the signed state log: a withdrawal deleted from registry.db is an error, not a
            # manifest saying no cohort withdrew (IntegrityError, exit 1, nothing written)
            withdrawn = withdrawn_among(reg.contributors(art), reg.withdrawn_cohorts(verify=True))
            out.mkdir(parents=True, exist_ok=True)
            # the config the version was registered with (a Hugging Face folder's config.json, a run model's
            # metadata) and its tokenizer's and generation config's files: written back so the pulled folder is a
            # checkpoint `deltaplane deploy` and `load_checkpoint` take, tokenizer included, as the registered
            # folder was. Their names are the registry's fixed list (checked on read), never a path.
            config = art.lineage.get("config")
            extras = dict(reg.load_files(art))  # hash-checked against the signed lineage
            if isinstance(config, dict):
                extras["config.json"] = json.dumps(config, indent=2).encode()
            pulled_before = (out / "manifest.json").is_file()
            manifest = {**art.to_dict(), "verified": True, "consent": {"withdrawn_cohorts": withdrawn}}
            written = {
                "model.safetensors": weights,
                "manifest.json": json.dumps(manifest, indent=1).encode(),
                **extras,
            }
            tmps = {name: out / f"{name}.tmp" for name in written}
            try:  # all written in full before any replaces a previous pull's: never a model with another's manifest
                for name, data in written.items():
                    tmps[name].write_bytes(data)
                for name, tmp in tmps.items():
                    tmp.replace(out / name)
                if pulled_before:  # a previous pull's config and tokenizer are not this version's
                    for name in ("config.json", *COMPANION_FILES):
                        if name not in written:
                            (out / name).unlink(missing_ok=True)
            finally:  # an error or Ctrl-C half way leaves no partial file behind
                for tmp in tmps.values():
                    tmp.unlink(missing_ok=True)
        if withdrawn:  # not a note: -q does not silence it
            error_console.print(
                f"[yellow]warning:[/yellow] {escape(art.ref)} was trained on "
                f"{escape(', '.join(repr(c) for c in withdrawn))}, which withdrew consent: it may not be promoted, "
                "served or used as a round base (manifest.json's consent.withdrawn_cohorts names them)",
                soft_wrap=True,
            )
        console.print(
            f"pulled [bold]{escape(art.ref)}[/bold] (sha256 {art.sha256[:16]}…, signature verified) → "
            f"{escape(str(out))}",
            soft_wrap=True,
        )

    @reg_app.command("list")
    def registry_list(
        model: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
        home: Home = None,
        as_json: JsonFlag = False,
    ) -> None:
        """List versions with their tags, lineage (a one-line summary; the whole record with --json or `registry
        show`), sizes and creation times."""
        from deltaplane.registry import Registry
        from deltaplane.registry.lineage import summarize_lineage

        with _errors():
            reg = Registry(_home(home))
            versions = reg.versions(model)
            tags = {m: reg.tags(m) for m in {a.model for a in versions}}

            def tags_of(a: Any) -> list[str]:
                return sorted(t for t, n in tags[a.model].items() if n == a.number and a.kind == "model")

            if as_json:
                typer.echo(json.dumps([a.to_dict() | {"tags": tags_of(a)} for a in versions], indent=2))
                return
            summaries = [summarize_lineage(a.lineage) for a in versions]
            # the lineage as a one-line summary (a fleet's first version carries its whole run config, which
            # buried the table); the caption says where the whole record is, so nothing is hidden unsaid
            table = Table(
                caption="lineage: a summary (+N more: fields not shown); the whole record: "
                "deltaplane registry show REF, or --json",
                caption_justify="left",
                box=box.SIMPLE_HEAD,
                pad_edge=False,
                collapse_padding=True,
            )
            table.add_column("ref", overflow="fold")
            table.add_column("kind", overflow="fold")
            table.add_column("parent", justify="right", no_wrap=True)
            table.add_column("size", justify="right", no_wrap=True)
            table.add_column("tags", overflow="fold")
            table.add_column("lineage", overflow="fold", ratio=1)  # the room the others leave
            table.add_column("cohorts", overflow="fold")
            table.add_column("created")
            for a, (lineage, _) in zip(versions, summaries, strict=True):
                table.add_row(
                    escape(a.ref),
                    a.kind if a.kind == "model" else f"delta {a.base}->{a.target}",
                    str(a.parent or ""),
                    f"{a.size:,}",
                    escape(",".join(tags_of(a))),
                    escape(lineage),
                    escape(",".join(a.governance.cohorts)),
                    human_time(a.created_at),
                )
            fit_table(table, console.width)
        console.print(table)

    @reg_app.command("show")
    def registry_show(
        ref: Annotated[str, typer.Argument(help="model@N or model:tag")],
        home: Home = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Print a version's metadata, evaluations and model card (JSON with --json)."""
        from deltaplane.registry import Registry

        with _errors():
            reg = Registry(_home(home))
            art = reg.resolve(ref)
            card = reg.card_entry(art)
            doc = art.to_dict() | {
                "evaluations": reg.evaluations(art),
                "card": None if card is None else card[0],
                "card_record": None if card is None else card[1],
                "governance_problems": reg.governance_problems(art),
            }
        if as_json:
            typer.echo(json.dumps(doc, indent=2, default=str))
            return
        table = Table(show_header=False, box=None)
        table.add_column(no_wrap=True)
        table.add_column(
            overflow="fold"
        )  # a long hash or path folds, never cut to "…": this is the whole record
        for key in ("ref", "kind", "sha256", "size", "parent", "base", "target", "codec"):
            if doc.get(key) is not None:
                table.add_row(key, escape(f"{doc[key]:,}" if key == "size" else str(doc[key])))
        table.add_row("created", human_time(art.created_at))
        table.add_row("lineage", escape(json.dumps(doc["lineage"], sort_keys=True)))
        table.add_row("governance", escape(json.dumps(doc["governance"], sort_keys=True)))
        for problem in doc["governance_problems"]:
            table.add_row("[red]problem[/red]", escape(problem))
        for ev in doc["evaluations"]:
            metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(ev["metrics"].items()))
            table.add_row(
                "evaluation",
                escape(f"{ev['evaluator']}: {metrics} ({human_time(ev['at'])})")
                + _record_label(ev["record"]),
            )
        table.add_row("card", "none" if card is None else "attached" + _record_label(card[1]))
        console.print(table)

    @reg_app.command("verify")
    def registry_verify(
        home: Home = None,
        no_signatures: Annotated[bool, typer.Option("--no-signatures", help="Only check hashes.")] = False,
        trusted: Trusted = None,
        expect_head: Annotated[
            str | None,
            typer.Option(
                "--expect-head",
                metavar="INDEX:SHA256",
                help="A state log head printed by an earlier verify and kept outside HOME: fail unless the log "
                "still contains it (catches newest tag/withdrawal entries removed, which signatures cannot).",
            ),
        ] = None,
    ) -> None:
        """Integrity check: every blob's hash, every row's blob, every signature, and the signed state log (tags,
        tag history, withdrawals). Exit 1 on problems."""
        from deltaplane.errors import IntegrityError
        from deltaplane.registry import Registry
        from deltaplane.registry.signing import load_trusted_keys

        pin = _pin(trusted)
        with _errors():
            try:
                verifier = load_trusted_keys(pin) if pin and not no_signatures else None
                rep = Registry(_home(home), verifier=verifier).verify(
                    signatures=not no_signatures, expect_head=expect_head
                )
            except IntegrityError as exc:  # the database itself is unreadable: a finding, not a crash
                error_console.print(f"[red]problem:[/red] {escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(code=1) from None
        console.print(
            f"{count(rep.rows_checked, 'version')}, {count(rep.blobs_checked, 'blob')} checked; "
            f"{count(len(rep.orphans), 'orphan blob')}, {count(len(rep.temp_files), 'temp file')} (safe to gc)"
        )
        if not no_signatures:  # what the signatures prove depends on where the trusted keys live
            console.print(
                f"signatures checked against the keys pinned in {escape(str(pin))}"
                if pin
                else "signatures checked against the keys inside the home: this shows the home is consistent, "
                "not that its keys are yours (pin them with --trusted or $DELTAPLANE_TRUSTED_KEYS)",
                soft_wrap=True,
            )
        if rep.log_head is not None:
            console.print(
                f"state log head {rep.log_head}: keep it outside HOME and pass it to a later verify as "
                "--expect-head to detect removed tag/withdrawal entries",
                soft_wrap=True,
            )
        for n in rep.notes:
            console.print(f"[yellow]note:[/yellow] {escape(n)}", soft_wrap=True)
        for p in rep.problems:
            error_console.print(f"[red]problem:[/red] {escape(p)}", soft_wrap=True)
        if not rep.ok:
            raise typer.Exit(code=1)
        console.print("[green]registry OK[/green]")

    @reg_app.command("repair")
    def registry_repair(
        home: Home = None,
        trusted: Trusted = None,
        expect_head: Annotated[
            str | None,
            typer.Option(
                "--expect-head",
                metavar="INDEX:SHA256",
                help="A state log head printed by an earlier verify and kept outside HOME: refuse unless the log "
                "still contains it (a log cut short would otherwise revert the tables to its older state).",
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Only list what differs and would be rewritten.")
        ] = False,
    ) -> None:
        """Rewrite tags, tag history and withdrawals to what the signed state log replays to, after verifying the
        log (chain, every signature, --expect-head). Exit 1, changing nothing, when the log does not verify."""
        from deltaplane.errors import IntegrityError
        from deltaplane.registry import Registry
        from deltaplane.registry.signing import load_trusted_keys

        pin = _pin(trusted)
        with _errors():
            verifier = load_trusted_keys(pin) if pin else None
            try:
                rep = Registry(_home(home), verifier=verifier).repair_from_log(expect_head, dry_run=dry_run)
                if rep.applied:  # a fresh handle replays the whole log again and compares it with the tables
                    Registry(_home(home), verifier=verifier).check_state()
            except IntegrityError as exc:  # a log that does not verify: a finding, as for verify
                error_console.print(f"[red]problem:[/red] {escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(code=1) from None
        for u in rep.unrepaired:  # bound by SHA-256 only: the log cannot say what the row held
            error_console.print(
                f"[red]cannot repair:[/red] {escape(u)} (the log holds its SHA-256, not its content: restore "
                "registry.db from a backup)",
                soft_wrap=True,
            )
        if not rep.differences:
            if not rep.unrepaired:
                console.print(
                    f"nothing to repair: the tables equal the signed state log (head {rep.log_head})",
                    soft_wrap=True,
                )
            if rep.unrepaired:
                raise typer.Exit(code=1)
            return
        verb = "would rewrite" if dry_run else "rewrote"
        for d in rep.differences:
            console.print(f"{verb}: {escape(d)}", soft_wrap=True)
        for n in rep.notes:
            console.print(f"[yellow]note:[/yellow] {escape(n)}", soft_wrap=True)
        if dry_run:
            console.print(
                f"dry run: {count(len(rep.differences), 'row')} "
                f"{'differs' if len(rep.differences) == 1 else 'differ'} from the signed state log; nothing changed"
            )
        else:
            console.print(
                f"[green]repaired {count(len(rep.differences), 'row')}: the tags, tag history and withdrawals equal the "
                f"signed state log (head {rep.log_head})[/green]",
                soft_wrap=True,
            )
        if rep.unrepaired:
            raise typer.Exit(code=1)

    @reg_app.command("tag")
    def registry_tag(
        ref: Annotated[str, typer.Argument(help="model@N")],
        tag: Annotated[
            str, typer.Argument(help="e.g. staging, canary (not production, production.<cohort>)")
        ],
        home: Home = None,
    ) -> None:
        """Point a tag at a version without the gate (refused for 'production' and 'production.<cohort>', which
        devices are served: use promote)."""
        from deltaplane.registry import Registry
        from deltaplane.registry.store import is_gated_tag

        with _errors():
            if is_gated_tag(tag):
                raise ConfigError(
                    f"{tag!r} only moves through the gate: `deltaplane registry promote {ref} --to {tag} "
                    "--evaluator ...` (or back with `deltaplane registry rollback MODEL --tag ...`)"
                )
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
                help="metric=allowed_drop (repeatable) \\[default: accuracy=0.01, ood_accuracy=0.02]."
            ),
        ] = None,
        home: Home = None,
    ) -> None:
        """Evaluate VERSION and the current holder of the tag; promote only if nothing regressed."""
        from deltaplane.registry import Registry, promote

        with _errors():
            fn = load_evaluator(evaluator)
            # the gate: --tolerance if given, else what the evaluator declares, else the default limits
            declared = getattr(fn, "tolerance", None)
            if tolerance:
                gate = _tolerance(tolerance)
            elif declared is not None:
                from deltaplane.registry import Tolerance

                gate = Tolerance(dict(declared))
            else:
                gate = _tolerance(None)
            err_console.print(
                "gate: "
                + ", ".join(f"{k} may drop by at most {v:g}" for k, v in gate.limits.items())
                + (
                    ""
                    if tolerance or declared is not None
                    else " (defaults; set --tolerance or evaluate.tolerance)"
                )
            )
            res = promote(
                Registry(_home(home)), ref, to=to, evaluator=fn, tolerance=gate, evaluator_name=evaluator
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
            if cohort and cohort_arg and cohort != cohort_arg:
                raise ConfigError(
                    f"two cohorts given ({cohort_arg!r} and --cohort {cohort!r}); name one per withdrawal"
                )
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
        console.print(f"removed {count(n, 'file')}")

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
            f"{count(rep.kills, 'kill')}, {count(rep.committed, 'committed version')}, "
            f"{count(len(rep.problems), 'problem')}, "
            f"{rep.seconds:.1f}s"
        )
        for p in rep.problems[:20]:
            error_console.print(f"[red]problem:[/red] {escape(p)}", soft_wrap=True)
        if not rep.ok:
            raise typer.Exit(code=1)

    @app.command("serve")
    def serve_cmd(
        home: Home = None,
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Port = 8000,
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
        federation: Annotated[
            Path | None,
            typer.Option(
                "--federation",
                help="YAML run config whose server side the rounds run (aggregator chain, DP, downlink, task); its task is built at start, and a task that brings its own devices in another number than clients.count is refused.",
                show_default="none: plain FedAvg",
            ),
        ] = None,
        aggregator: Annotated[
            str | None,
            typer.Option(help=f"Server optimizer: {AGGREGATORS.names()}.", show_default="fedavg"),
        ] = None,
        server_lr: Annotated[
            float | None, typer.Option(help="FedAvg's server step.", show_default="1.0")
        ] = None,
        clip: Annotated[
            str | None,
            typer.Option(
                help="Per-update L2 clip norm: a number or 'adaptive'.", show_default="none (no clipping)"
            ),
        ] = None,
        dp_noise: Annotated[
            float | None,
            typer.Option(help="DP-FedAvg noise multiplier z (needs --clip).", show_default="0 (no DP)"),
        ] = None,
        epsilon_budget: Annotated[
            float | None,
            typer.Option(help="Refuse to close a round that would spend more epsilon.", show_default="none"),
        ] = None,
        defense: Annotated[
            str | None,
            typer.Option(
                help=(
                    "Robust rule: trimmed_mean:0.2, median, krum:1, geometric_median, centered_clip(1.0), "
                    "fltrust (needs --task)."
                ),
                show_default="none",
            ),
        ] = None,
        max_update_norm: Annotated[
            float | None, typer.Option(help="Refuse updates with a larger norm.", show_default="none")
        ] = None,
        fleet: Annotated[
            int | None,
            typer.Option(
                min=1,
                help=(
                    "Devices in the fleet (DP accounting: the service does not sample devices, so under "
                    "--dp-noise --per-round must be the whole fleet and ε is accounted at q = 1)."
                ),
                show_default="the federation's clients",
            ),
        ] = None,
        per_round: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="Devices expected per round (DP-FedAvg's denominator).",
                show_default="the whole fleet",
            ),
        ] = None,
        task: Annotated[
            str | None,
            typer.Option(
                help="Task 'package.module:factory' (FLTrust trains on its root data).", show_default="none"
            ),
        ] = None,
        runs_dir: Annotated[
            Path | None,
            typer.Option("--runs", help="Folder of run reports (report.json) the dashboard at /ui lists."),
        ] = None,
        secagg_revocations: Annotated[
            Path | None,
            typer.Option(
                "--secagg-revocations",
                help="The enrollment authority's revocation list (keys revoke), read at each SecAgg round open: "
                "authenticated rounds refuse revoked devices' keys (422) and go on without them, and do not open "
                "once it is past its next update. POST /admin/secagg/revocations replaces it without a restart "
                "(it may not exist until then); devices fetch it from GET /v1/secagg/revocations.",
                show_default="none",
            ),
        ] = None,
        secagg_enrollment_authority: Annotated[
            Path | None,
            typer.Option(
                "--secagg-enrollment-authority",
                exists=True,
                dir_okay=False,
                help="The enrollment authority's public key (enrollment.ed25519.pub): the service verifies its "
                "revocation list under it (at start, at each round open and upload: another authority's list is "
                "refused), and takes uploads only with it. Without it the list is used unchecked (a warning).",
                show_default="none",
            ),
        ] = None,
        max_json_bytes: Annotated[int, typer.Option(help="Limit of every non-upload request body.")] = 2
        << 20,
        body_timeout: Annotated[
            float, typer.Option(help="Seconds a request body may take to arrive in full (408 after that).")
        ] = 120.0,
        max_examples: Annotated[
            float,
            typer.Option(
                help="Largest num_examples an upload may claim (its weight in FedAvg); 422 above it. A weighted "
                "SecAgg round must carry it: bits-bit rings carry counts up to 2^bits - 1 (422 at open otherwise)."
            ),
        ] = 100_000,
        max_connections: Annotated[
            int, typer.Option(help="Connections held at once; a request beyond them gets 503.")
        ] = 1000,
        max_connections_per_address: Annotated[
            int,
            typer.Option(
                min=1,
                help="Connections one client address may hold (503 beyond); loopback is exempt. Raise it for a "
                "fleet behind one NAT address or a reverse proxy on another host.",
            ),
        ] = 100,
        max_device_requests: Annotated[
            int,
            typer.Option(
                min=1,
                help="Requests one device may have in flight at once; one more gets 429, its body unread.",
            ),
        ] = 4,
        max_body_bytes_in_flight: Annotated[
            int | None,
            typer.Option(
                min=1024,
                help="Bytes of request bodies all devices (and the admin) may hold at once, reserved from each "
                "body's Content-Length (its route's cap without one) before it is read; a body beyond it gets "
                "503 with Retry-After, unread. At least --max-upload-bytes and --max-json-bytes.",
                show_default="16 x --max-upload-bytes",
            ),
        ] = None,
        max_device_body_bytes: Annotated[
            int | None,
            typer.Option(
                min=1024,
                help="Bytes of --max-body-bytes-in-flight one device may reserve at once; its body beyond it gets "
                "429 with Retry-After, unread, so a few stolen tokens cannot fill the budget. At least "
                "--max-upload-bytes and --max-json-bytes.",
                show_default="1/8 of the budget",
            ),
        ] = None,
        min_body_rate: Annotated[
            float,
            typer.Option(
                min=0,
                callback=finite_number,
                help="Bytes/s a device's body must average once --body-rate-grace has passed (and the pace that "
                "brings its Content-Length within --body-timeout); a slower one gets 408, frees its share of the "
                "budget, and its device may send no other body for 6 graces (429). 0: none (only --body-timeout).",
            ),
        ] = 4096.0,
        body_rate_grace: Annotated[
            float,
            typer.Option(
                callback=finite_number,
                help="Seconds a body may take before --min-body-rate applies. Positive.",
            ),
        ] = 10.0,
        write_timeout: Annotated[
            float,
            typer.Option(
                callback=finite_number,
                help="Seconds a response may wait on a client that reads none of it (its buffer full) before "
                "the connection is aborted. Positive.",
            ),
        ] = 60.0,
        max_update_norm_ratio: Annotated[
            float | None,
            typer.Option(
                min=0,
                help="Refuse uploads whose norm exceeds this many times the base model's (0: no guard).",
                show_default="10, or the norm an honest update reaches with the federation's DP noise if larger",
            ),
        ] = None,
        tls_cert: TlsCert = None,
        tls_key: TlsKey = None,
        tls_client_ca: Annotated[
            Path | None,
            typer.Option(
                help="Require device certificates signed by this CA (mutual TLS).", show_default="none"
            ),
        ] = None,
        insecure_http: InsecureHttp = False,
        threads: Threads = DEFAULT_THREADS,
        session_idle_minutes: SessionIdleMinutes = 30,
        session_max_hours: SessionMaxHours = 12,
        flush_every: Annotated[
            float,
            typer.Option(
                callback=finite_number,
                help="Seconds between saves of the fleet's contacts and upload counts no report, upload, close or "
                "abort carried (one transaction, only when something changed): what a crash can lose. Positive, "
                "at most an hour.",
            ),
        ] = 5.0,
    ) -> None:
        """Start the device-facing HTTP(S) service (OpenAPI docs at /docs, dashboard at /ui).

        With any of --federation, --aggregator, --clip, --dp-noise, --defense (...) the rounds run that
        server step (the engine's: same chain as ``deltaplane run``), and closing a round reports its epsilon
        and clipping; otherwise plain FedAvg at --server-lr.
        """
        import secrets

        from deltaplane.serve import ServiceConfig, create_app, serve
        from deltaplane.serve.revocation_routes import unchecked_revocations_warning

        with _errors():
            check_threads(threads)
            chain = {
                "aggregator": aggregator, "server_lr": server_lr, "clip": clip, "dp_noise": dp_noise,
                "epsilon_budget": epsilon_budget, "defense": defense, "max_update_norm": max_update_norm,
                "task": task,
            }  # fmt: skip
            chain = {k: v for k, v in chain.items() if v is not None}
            run = None
            if federation is not None or chain or fleet is not None or per_round is not None:
                from deltaplane.engine import RunConfig, build_clients, make_task

                working_dir_on_path()  # a federation of `task: mytask:make_task` finds mytask.py here
                run = RunConfig.from_yaml(federation) if federation is not None else RunConfig()
                if federation is not None and (own := make_task(run)).clients is not None:
                    # `fleet init`, `device` and `coordinate` build the devices from this same file and refuse
                    # a task that brings its own devices in another number than clients.count: refuse it here
                    # too, before anything is started, rather than serve rounds no fleet device can join.
                    # (A task that partitions its data is not built here: a served federation's clients may
                    # count devices bringing their own data, more than the task's data could partition.)
                    build_clients(run, own)
                if fleet is not None or per_round is not None:
                    size = fleet if fleet is not None else run.clients
                    chain |= {"clients": size, "sample_fraction": min(1.0, (per_round or size) / size)}
                if federation is None or "downlink_codec" not in run.model_fields_set:
                    chain["downlink_codec"] = downlink_codec
                run = run.replace(**chain)
            token = admin_token or secrets.token_urlsafe(24)
            if admin_token is None:
                error_console.print(  # the only way in: -q never hides it
                    f"admin token (set DELTAPLANE_ADMIN_TOKEN to choose one): {token}", soft_wrap=True
                )
            config = ServiceConfig(
                home=str(_home(home)),
                admin_token=token,
                device_secret=device_secret or os.environ.get("DELTAPLANE_DEVICE_SECRET", ""),
                max_upload_bytes=max_upload_bytes,
                rate=rate,
                burst=burst,
                runs_dir=str(runs_dir) if runs_dir else "",
                secagg_revocations=str(secagg_revocations) if secagg_revocations else "",
                secagg_authority=str(secagg_enrollment_authority) if secagg_enrollment_authority else "",
                max_json_bytes=max_json_bytes,
                body_timeout_s=body_timeout,
                max_examples=max_examples,
                max_connections=max_connections,
                max_connections_per_address=max_connections_per_address,
                max_device_requests=max_device_requests,
                max_body_bytes_in_flight=max_body_bytes_in_flight,
                max_device_body_bytes=max_device_body_bytes,
                min_body_rate=min_body_rate,
                body_rate_grace_s=body_rate_grace,
                write_timeout_s=write_timeout,
                max_update_norm_ratio=(
                    "auto" if max_update_norm_ratio is None else max_update_norm_ratio or None
                ),
                session_idle_s=round(session_idle_minutes * 60),
                session_max_s=round(session_max_hours * 3600),
                flush_every_s=flush_every,
                **({"federation": run} if run is not None else {"downlink_codec": downlink_codec}),
            )
            ssl_options = _listen_ssl(host, tls_cert, tls_key, tls_client_ca, insecure_http)
            app_ = create_app(config, evaluator=load_evaluator(evaluator) if evaluator else None)
            if (unchecked := unchecked_revocations_warning(config)) is not None:
                err_console.print(escape(unchecked), soft_wrap=True)
        scheme = "https" if ssl_options else "http"
        err_console.print(
            f"dashboard: {escape(_dashboard_url(scheme, host, port))} (sign in with the admin token)",
            soft_wrap=True,
        )
        with cpu_threads(threads):  # decoding and aggregating uploads, in every request thread
            serve(app_, host=host, port=port, ssl_options=ssl_options)

    @app.command("ui")
    def ui_cmd(
        home: Home = None,
        runs_dir: Annotated[
            Path, typer.Option("--runs", help="Folder searched for run reports (report.json).")
        ] = Path("runs"),
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Port = 8050,
        admin_token: Annotated[
            str | None,
            typer.Option(envvar="DELTAPLANE_ADMIN_TOKEN", help="Token to sign in with (>= 16 chars)."),
        ] = None,
        tls_cert: TlsCert = None,
        tls_key: TlsKey = None,
        insecure_http: InsecureHttp = False,
        session_idle_minutes: SessionIdleMinutes = 30,
        session_max_hours: SessionMaxHours = 12,
    ) -> None:
        """Serve the dashboard (runs and registry, no fleet) for a registry home and a runs folder.

        Plain HTTP on loopback only, as ``deltaplane serve``: another --host needs --tls-cert/--tls-key, or
        --insecure-http behind a TLS-terminating proxy.
        """
        import secrets

        from deltaplane.serve import serve
        from deltaplane.ui import SessionLimits, create_ui_app

        with _errors():
            token = admin_token or secrets.token_urlsafe(24)
            if admin_token is None:
                error_console.print(  # the only way in: -q never hides it
                    f"admin token (set DELTAPLANE_ADMIN_TOKEN to choose one): {token}", soft_wrap=True
                )
            reg_home = _home(home)
            if reg_home.exists() and not reg_home.is_dir():
                raise ConfigError(f"--home {reg_home} is a file; give the registry's folder")
            if runs_dir.exists() and not runs_dir.is_dir():
                raise ConfigError(f"--runs {runs_dir} is a file; give the folder the run reports are under")
            if home is not None and not (reg_home / "registry.db").exists():
                err_console.print(escape(f"no registry in {reg_home}: showing the runs only"), soft_wrap=True)
            ssl_options = _listen_ssl(host, tls_cert, tls_key, None, insecure_http)
            app_ = create_ui_app(
                admin_token=token,
                runs_dir=str(runs_dir),
                registry_home=str(reg_home) if (reg_home / "registry.db").exists() else None,
                session_limits=SessionLimits(
                    idle_s=round(session_idle_minutes * 60), max_s=round(session_max_hours * 3600)
                ),
            )
        err_console.print(
            escape(f"dashboard: {_dashboard_url('https' if ssl_options else 'http', host, port)}"),
            soft_wrap=True,
        )
        serve(app_, host=host, port=port, ssl_options=ssl_options)


def _dashboard_url(scheme: str, host: str, port: int) -> str:
    """The dashboard's address for the listening host (an IPv6 literal in brackets: :func:`listen_url`)."""
    from deltaplane.serve.server import listen_url

    return listen_url(scheme, host, port) + "/ui/"
