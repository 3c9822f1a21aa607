"""Secure aggregation over Flower messages: deltaplane's SecAgg(+) stages carried by a Grid, both sides Flower-idiomatic.

Partners: :class:`SecAggStrategy` (ServerApp) and :func:`secagg_mod` + :func:`add_secagg` (ClientApp). The four
stages of :mod:`deltaplane.aggregation.secagg` travel as Flower messages whose :data:`SECAGG_KEY` ConfigRecord
holds the stage's bytes (the same strict encodings the HTTP service carries):

* ``query.secagg`` *advertise* — the round's public parameters, the node's client id and the server's SecAgg
  message version (``secagg-version``: a node of another version refuses the round here, before it trains, with a
  :class:`~deltaplane.aggregation.secagg.SecAggError` saying which side to upgrade), and in authenticated rounds
  the strategy's revocation list when it holds one (``revocations``, optional: :func:`take_offered_revocations`)
  → ``AdvertiseKeys``;
* ``query.secagg`` *share* — the key roster → ``ShareKeys``;
* ``train`` — the usual deltaplane train instruction plus the node's ``ShareInbox``; the node trains, compresses
  with :func:`~deltaplane.flower.delta_mod` (error feedback included), decodes *its own* payload, quantizes it
  into the ring with its example count in a masked slot, and replies with the ``MaskedInput`` *only*: the
  payload, the weights and the example count never leave the node;
* ``query.secagg`` *consistency* (authenticated rounds only) — the frozen ``UnmaskRequest`` → the node's
  ``SurvivorSignature`` of it (Bonawitz et al. 2017 §4, "ConsistencyCheck");
* ``query.secagg`` *unmask* — the frozen ``UnmaskRequest`` (and, authenticated, the ``SurvivorSignatures``) →
  ``UnmaskResponse``.

Authenticated rounds (``SecAggStrategy(authenticated=True)``, against a server that substitutes keys or shows
nodes different survivor sets) have the meaning they have on the HTTP service, and the opt-in is the *node's*:
a node enrolled by an enrollment authority (its credentials from its own ``node_config``,
:data:`NODE_CONFIG_KEYS`, or ``credentials=`` of :func:`secagg_mod` and :func:`add_secagg`) signs its key
advertisement, refuses a roster it cannot authenticate and runs the consistency check before it unmasks; it
refuses a round that is not authenticated at key advertisement, before it trains. A node without credentials
refuses an authenticated round (it could not sign). A strategy holding the authority's revocation list sends it
with each key advertisement, as the HTTP service serves it to fleet devices before each round: the node takes it
only if its own authority signed it and it is newer than its own (kept in its ``secagg-revocations`` file), so
a node revoked since it last read its file sits the round out. Each refusal is a typed
:class:`~deltaplane.aggregation.secagg.SecAggAuthError`, which Flower reports as the node's error reply.

A node that fails or does not answer a stage has dropped out of it; a masked input that arrives after the
unmasking request is refused. The strategy then unmasks the sum and hands the weighted mean to the engine's
server step (:meth:`~deltaplane.engine.ServerStep.receive_secure_sum`): the same chain, downlink and publisher
as every other driver.

Why not Flower's own ``SecAggPlusWorkflow``: it belongs to the legacy ``fit`` workflow and quantizes the float
``FitRes`` parameters itself; deltaplane's uplink is a compressed payload and its client step ends in ring codes
of the *decoded* payload (so codecs and error feedback keep their meaning), which that workflow cannot carry.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import Grid

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceEndpoint,
    RingEncoding,
    SecAggAuthError,
    SecAggConfig,
    SecAggError,
    ServerEndpoint,
    check_device_policy,
    default_threshold,
    group_size,
    round_neighbours,
)
from deltaplane.aggregation.secagg.enrollment import NODE_CONFIG_KEYS, REVOCATIONS_NODE_CONFIG_KEY
from deltaplane.aggregation.secagg.identity import TrustedAuthorities, check_round_authentication
from deltaplane.aggregation.secagg.messages import VERSION as MESSAGE_VERSION
from deltaplane.aggregation.secagg.messages import check_stated_version
from deltaplane.aggregation.secagg.revocation import (
    RevocationList,
    read_server_revocations,
    take_revocations,
    take_revocations_file,
    take_revocations_from_path,
    trusts_kept_list,
)
from deltaplane.codecs import decompress
from deltaplane.delta import Delta
from deltaplane.engine.secure import device_seed, lone_input_error, masked_zeros
from deltaplane.errors import ConfigError, DeltaplaneError
from deltaplane.flower.records import (
    CONTROL_KEY,
    UPLINK_KEY,
    as_bytes,
    as_int,
    content_bytes,
    field_bytes,
    payload_of,
)
from deltaplane.flower.strategy import DeltaStrategy

__all__ = [
    "NODE_CONFIG_KEYS",
    "QUERY_TYPE",
    "REVOCATIONS_NODE_CONFIG_KEY",
    "SECAGG_KEY",
    "SecAggStrategy",
    "add_secagg",
    "node_credentials",
    "secagg_mod",
    "take_offered_revocations",
]

#: ConfigRecord of every SecAgg message: ``stage`` and the stage's bytes (server → node), ``message`` (reply).
SECAGG_KEY = "deltaplane.secagg"
#: Flower message type of the stages that are not training.
QUERY_TYPE = "query.secagg"
_STATE = "deltaplane.secagg-state"
#: the node's state record of the newest revocation list a server offered it, when it has no file to keep it in
_TAKEN = "deltaplane.secagg-revocations"
_log = logging.getLogger(__name__)
#: who trusts the key a strategy verifies its revocation list under, as a refusal of another authority's says
_HOLDER = "this SecAggStrategy (its enrollment_authority= key)"
_T = TypeVar("_T")


def node_credentials(node_config: Mapping[str, object]) -> DeviceCredentials | None:
    """The node's SecAgg credentials from its own ``node_config`` (:data:`NODE_CONFIG_KEYS`), None without any.

    They come from the node's configuration (``flower-supernode --node-config``, a simulation's per-node config),
    never from a server message: the server cannot switch a node's authentication off. Half an enrollment is a
    :class:`~deltaplane.errors.ConfigError` (a node must not silently run unauthenticated), and so is a missing,
    oversized or malformed file, named. The optional :data:`REVOCATIONS_NODE_CONFIG_KEY` (``secagg-revocations``)
    names the enrollment authority's revocation list: the node then refuses any roster seating a device it revokes.
    The list is read at each stage (a newer one the operator writes there applies at once) and never goes back:
    a file rolled back to a lower sequence than this process has taken from it is a
    :class:`~deltaplane.aggregation.secagg.errors.RevocationRollback`
    (:func:`~deltaplane.aggregation.secagg.revocation.take_revocations_file`), so the node refuses the stage. A
    list of an authority the node no longer trusts (its enrollment authority was changed) is refused as before
    (:class:`~deltaplane.aggregation.secagg.errors.SecAggAuthError`), saying to write the new authority's list there.
    """
    given = {k: node_config.get(k) for k in NODE_CONFIG_KEYS}
    revocations = node_config.get(REVOCATIONS_NODE_CONFIG_KEY)
    if revocations is not None and not (isinstance(revocations, str) and revocations):
        raise ConfigError(f"node_config {REVOCATIONS_NODE_CONFIG_KEY} is a file path; got {revocations!r}")
    if all(v is None for v in given.values()):
        if revocations is not None:
            raise ConfigError(
                f"this node's node_config names {REVOCATIONS_NODE_CONFIG_KEY} but no enrollment "
                f"({', '.join(NODE_CONFIG_KEYS)}): a node checks revocations only in authenticated rounds"
            )
        return None
    missing = [k for k, v in given.items() if not (isinstance(v, str) and v)]
    if missing:
        raise ConfigError(
            f"this node's node_config names {', '.join(k for k in given if k not in missing)} but not "
            f"{', '.join(missing)}: a node's SecAgg enrollment is all three files or none (its identity key and "
            "certificate, which `deltaplane keys certify` writes, and the enrollment authority's "
            "public key)"
        )
    credentials = DeviceCredentials.from_files(*(str(given[k]) for k in NODE_CONFIG_KEYS))
    if revocations is None:
        return credentials
    try:
        return take_revocations_file(credentials, revocations)
    except SecAggAuthError as exc:
        if trusts_kept_list(credentials.trusted, revocations):
            raise
        # the old authority's list, kept after the node's enrollment moved to a new authority: the same type as
        # before (the node refuses the stage), now with what to do, as the fleet device's refusal says
        raise SecAggAuthError(
            f"{exc}. If the enrollment authority was changed, write the new authority's list to {revocations} "
            f"(this node's {REVOCATIONS_NODE_CONFIG_KEY}) in place of the old authority's: `deltaplane keys revoke "
            "--authority-key NEW/enrollment.ed25519.pem --carry OLD-LIST --out NEW-LIST` writes it "
            "(docs/security.md, changing the enrollment authority)"
        ) from None


def _session(context: Context) -> bytes:
    """The name every node of a Flower run binds its signed advertisements to (with the round's config): the
    run id each node's own SuperNode runs it under, so a signature cannot be replayed into another run."""
    return f"flower-run/{context.run_id}".encode()


def _credentials(given: DeviceCredentials | None, context: Context) -> DeviceCredentials | None:
    """The node's credentials now: ``given`` or its ``node_config``'s, holding the newest list a server offered it
    when it has no revocation file to keep that list in (:func:`take_offered_revocations`)."""
    creds = given if given is not None else node_credentials(context.node_config)
    rec = context.state.config_records.get(_TAKEN)
    if creds is None or rec is None:
        return creds
    return creds.with_revocations(RevocationList.verified(as_bytes(rec["list"]), creds.trusted))


def _revocations_file(given: DeviceCredentials | None, context: Context) -> str | None:
    """The file a node keeps its revocation list in: its ``node_config``'s ``secagg-revocations``, when its
    credentials come from there (``credentials=`` in code names no file: the node's state keeps the list)."""
    path = context.node_config.get(REVOCATIONS_NODE_CONFIG_KEY) if given is None else None
    return path if isinstance(path, str) and path else None


def take_offered_revocations(
    data: object, credentials: DeviceCredentials | None, context: Context, *, keep: str | None
) -> DeviceCredentials | None:
    """``credentials`` holding the revocation list ``data`` a :class:`SecAggStrategy` sent with its key
    advertisement, if it is newer than the node's own; the same credentials otherwise.

    The node's side of the list's distribution, the Flower partner of a fleet device's
    :func:`~deltaplane.serve.fleet.refresh_revocations`, with its policy: the node trusts nothing about the list but
    its signature (:func:`~deltaplane.aggregation.secagg.revocation.take_revocations`: verified under the node's
    own enrollment authority, never a lower sequence than the one it holds), keeps a newer one in its revocation
    file ``keep`` (atomically, 0600) before using it, or without a file in its run state, so every later stage
    and round holds it too. A list it refuses (malformed, oversized, forged, another authority's, a rollback) or
    cannot keep is logged and the node's own stays; whether that list is current is checked next, as the round's
    authentication is (:class:`~deltaplane.aggregation.secagg.errors.RevocationsStale`). No list (a strategy
    without one, or from before it sent it) or no credentials: nothing to take."""
    if credentials is None or data is None:
        return credentials
    if not isinstance(data, bytes):
        _log.warning("refused the server's revocation list (not bytes); keeping this node's")
        return credentials
    try:
        taken = take_revocations(credentials, data, keep=keep)
    except SecAggAuthError as exc:
        _log.warning("refused the server's revocation list (%s); keeping this node's", exc)
        return credentials
    except OSError as exc:  # not kept: not taken either, so memory and file never disagree
        _log.warning(
            "the server's newer revocation list could not be kept in %s (%s); keeping this node's", keep, exc
        )
        return credentials
    if taken is credentials:
        return credentials
    rl = taken.revocations
    assert rl is not None
    if keep is None:
        context.state[_TAKEN] = ConfigRecord({"list": data})
    _log.info(
        "took revocation list number %d (%d revoked, current until %d)",
        rl.sequence,
        len(rl.revoked),
        rl.next_update,
    )
    return taken


def _check_authentication(
    authenticated: object, credentials: DeviceCredentials | None, round_id: int
) -> None:
    """A node takes part in an authenticated round if and only if it is enrolled (SecAggAuthError otherwise):
    the opt-in is the node's own, as on the HTTP service (:class:`~deltaplane.serve.secagg_client.SecAggDevice`)."""
    if not isinstance(authenticated, bool):
        raise SecAggError(
            f"the SecAgg invitation's 'authenticated' is {authenticated!r}, not a boolean; refused"
        )
    check_round_authentication(
        authenticated,
        credentials,
        round_id,
        this="node",
        enrolled_as="it is enrolled: node_config secagg-identity-key …",
        server_fix="; run the server with SecAggStrategy(authenticated=True)",
        unenrolled_fix=f"; give it one in its node_config ({', '.join(NODE_CONFIG_KEYS)}) or "
        "secagg_mod(credentials=…) and add_secagg(credentials=…)",
        stale_fix=f"the server's SecAggStrategy(revocations=) sends a current one, or the file its node_config "
        f"{REVOCATIONS_NODE_CONFIG_KEY} names holds one (`deltaplane keys revoke` issues it)",
    )


def _check_own(credentials: DeviceCredentials, round_id: int) -> None:
    """Refuse (:class:`~deltaplane.aggregation.secagg.SecAggAuthError`) a round this node's own certificate
    would fail in: every neighbour refuses a roster holding a certificate that does not verify under the
    authority it trusts, has expired or is revoked, so the whole round would fail for one node's enrollment.
    Refusing at key advertisement leaves the node out and the round goes on without it."""
    try:
        credentials.check_own()
    except SecAggAuthError as exc:
        raise SecAggAuthError(
            f"refusing SecAgg round {round_id}: this node's own certificate would be refused by its neighbours "
            f"({exc}); give it a current certificate of the authority its node_config secagg-enrollment-authority "
            "names (`deltaplane keys certify`)"
        ) from None


def _check_fresh_round(context: Context, round_id: int) -> None:
    """Refuse (:class:`SecAggError`) a key advertisement for a round this node already advertised in, or an
    earlier one, in this run: Flower's rounds only grow, and a signed advertisement or survivor signature binds
    the run and the round's parameters (:func:`_session`, ``round_binding``), so a server running a round number
    again would get signatures that verify in the earlier round too (replay across the two)."""
    rec = context.state.config_records.get(_STATE)
    if rec is None:
        return
    last = SecAggConfig.from_dict(json.loads(str(rec["config"]))).round_id
    if round_id <= last:
        raise SecAggError(
            f"refusing SecAgg round {round_id}: this node advertised keys for round {last} of this run already, "
            "and a run's rounds only grow (a server running a round again could replay the earlier round's "
            "signed messages)"
        )


def _save(context: Context, ep: DeviceEndpoint) -> None:
    enc = ep.encoding
    context.state[_STATE] = ConfigRecord(
        {
            "config": json.dumps(ep.config.to_dict()),
            "encoding": json.dumps([enc.bits, enc.clip_range, enc.weight_scale]),
            "state": ep.export_state(),
        }
    )


def _load(context: Context, round_id: int, credentials: DeviceCredentials | None) -> DeviceEndpoint:
    """The node's SecAgg endpoint for round ``round_id``, as it accepted the round at key advertisement;
    :class:`SecAggError` if it holds none for that round (it missed or refused the advertisement), and
    :class:`SecAggAuthError` if it accepted it enrolled and ``credentials`` is None now."""
    rec = context.state.config_records.get(_STATE)
    if rec is None:
        raise SecAggError(
            f"this node holds no SecAgg state for round {round_id}: it missed or refused the round's key "
            "advertisement, so it cannot take part in it"
        )
    config = SecAggConfig.from_dict(json.loads(str(rec["config"])))
    if config.round_id != round_id:
        raise SecAggError(
            f"this node's SecAgg state is for round {config.round_id}, not {round_id}: it missed or refused "
            f"round {round_id}'s key advertisement, so it cannot take part in it"
        )
    bits, clip, scale = json.loads(str(rec["encoding"]))
    return DeviceEndpoint.restore(
        config,
        RingEncoding(bits=bits, clip_range=clip, weight_scale=scale),
        as_bytes(rec["state"]),
        credentials=credentials,
        session=_session(context),
    )


def _reply(msg: Message, data: bytes) -> Message:
    return Message(RecordDict({SECAGG_KEY: ConfigRecord({"message": data})}), reply_to=msg)


def secagg_query(
    msg: Message,
    context: Context,
    *,
    min_inputs: int = 0,
    min_range: float = 0.0,
    credentials: DeviceCredentials | None = None,
) -> Message:
    """The node side of the query stages (register with :func:`add_secagg`). ``min_inputs`` is the
    node's own unmasking floor (distributed DP's m_min), kept in its SecAgg state from key advertisement on;
    ``min_range`` its own least ring range (distributed DP's C + 6σ_d): a narrower ``clip_range`` is refused at
    key advertisement, before the node sends anything. ``credentials``: the node's enrollment (None: from its
    ``node_config``, :func:`node_credentials`); an enrolled node takes only authenticated rounds, a node
    without credentials only the others (:class:`~deltaplane.aggregation.secagg.SecAggAuthError`)."""
    rec = msg.content.config_records[SECAGG_KEY]
    stage = str(rec["stage"])
    creds = _credentials(credentials, context)
    if stage == "advertise":
        raw = json.loads(str(rec["config"]))
        # first: a server of another message version would refuse every message (or send ones this node
        # refuses), so the node learns it here, before it trains
        check_stated_version(
            rec.get("secagg-version"),
            raw.get("round_id") if isinstance(raw, dict) else None,
            this="node",
            peer="server",
            unstated="a SecAggStrategy from before the advertise record stated it",
        )
        config = SecAggConfig.from_dict(raw)
        check_device_policy(config)  # the server chose the graph and threshold: refuse unsafe ones
        # a newer list first, as a fleet device fetches the service's: its currency and own certificate are next
        creds = take_offered_revocations(
            rec.get("revocations"), creds, context, keep=_revocations_file(credentials, context)
        )
        _check_authentication(rec.get("authenticated", False), creds, config.round_id)
        _check_fresh_round(context, config.round_id)
        if creds is not None:  # what every neighbour checks this node by: failing it, the node sits out
            _check_own(creds, config.round_id)
        bits, clip, scale = json.loads(str(rec["encoding"]))
        ep = DeviceEndpoint(
            as_int(rec["client-id"]),
            config,
            RingEncoding(bits=bits, clip_range=clip, weight_scale=scale),
            randbytes=secrets.token_bytes,
            min_inputs=min_inputs,  # the node's own, never from the server's message
            min_range=min_range,  # likewise
            credentials=creds,  # likewise
            session=_session(context),
        )
        out = ep.advertise()
    elif stage == "share":
        ep = _load(context, as_int(rec["round"]), creds)
        out = ep.share(field_bytes(rec["roster"], "SecAgg record field 'roster'"))
    elif stage == "consistency":
        ep = _load(context, as_int(rec["round"]), creds)
        out = ep.sign_survivors(field_bytes(rec["request"], "SecAgg record field 'request'"))
    elif stage == "unmask":
        ep = _load(context, as_int(rec["round"]), creds)
        signatures = rec.get("signatures")
        out = ep.unmask(
            field_bytes(rec["request"], "SecAgg record field 'request'"),
            bytes(signatures) if isinstance(signatures, bytes) else None,
        )
    else:
        raise DeltaplaneError(f"unknown SecAgg stage {stage!r}")
    _save(context, ep)
    return _reply(msg, out)


def add_secagg(
    app: ClientApp,
    *,
    min_inputs: int = 0,
    min_range: float = 0.0,
    credentials: DeviceCredentials | None = None,
) -> ClientApp:
    """Register the SecAgg query stages on ``app`` (its mods must include :func:`secagg_mod`).

    ``min_inputs``: the fewest masked inputs whose sum the node helps unmask; under distributed DP the m_min
    its noise is calibrated to (:meth:`~deltaplane.engine.RunConfig.unmask_floor`). An unmasking request with
    fewer survivors fails on the node (a SecAggError, so the node answers no shares and drops out of the
    stage), whatever the server asks. ``min_range``: the least ring range the node accepts (distributed DP's
    C + 6σ_d, :meth:`~deltaplane.engine.RunConfig.min_secagg_range`); a round with a narrower ``clip_range``
    fails on the node at key advertisement (:class:`~deltaplane.aggregation.secagg.SecAggRangeError`).
    ``credentials``: the node's enrollment for a ClientApp built in code (give :func:`secagg_mod` the same);
    None reads it from each node's ``node_config`` (:data:`NODE_CONFIG_KEYS`; none there: not enrolled)."""

    def secagg(msg: Message, context: Context) -> Message:
        return secagg_query(msg, context, min_inputs=min_inputs, min_range=min_range, credentials=credentials)

    app.query("secagg")(secagg)
    return app


def secagg_mod(
    *,
    seed: int = 0,
    seed_fn: Callable[[int, int, Context], int] | None = None,
    privacy: Callable[[Delta, int, Context], Delta] | None = None,
    credentials: DeviceCredentials | None = None,
) -> Mod:
    """A ClientApp mod that turns a node's compressed update into its masked SecAgg input.

    Partner: :class:`SecAggStrategy`. Place it *before* :func:`~deltaplane.flower.delta_mod` in
    ``ClientApp(mods=[secagg_mod(...), delta_mod(...)])``: it receives delta_mod's reply (the compressed payload),
    decodes it on the node, quantizes it into the ring seeded by ``seed_fn(seed, round, context)`` (default: the
    in-process engine's :func:`~deltaplane.engine.secure.device_seed` of the node's ``partition-id``) and replies
    with the masked input alone. It loads the node's SecAgg state for the round *before* the node trains: a
    node that missed or refused the round's key advertisement, or a train instruction without its share inbox,
    fails with :class:`~deltaplane.aggregation.secagg.SecAggError` (an error reply) without training. Messages
    without a SecAgg record pass through untouched. ``privacy(update,
    round, context)``, when given, runs on the decoded update before it enters the ring: distributed DP's
    clip and noise (:meth:`~deltaplane.engine.ClientStep.distributed_privacy`). ``credentials``: the node's
    enrollment, as given to :func:`add_secagg` (None: from the node's ``node_config``); a round the node accepted
    enrolled is resumed only with them.
    """

    def default_seed(s: int, rnd: int, context: Context) -> int:
        return device_seed(s, rnd, int(context.node_config.get("partition-id", context.node_id)))

    seeds = seed_fn or default_seed

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or SECAGG_KEY not in msg.content:
            return call_next(msg, context)
        rec = msg.content.config_records[SECAGG_KEY]
        # before training: a round this node accepted at key advertisement, with an inbox to mask with; a
        # round it cannot take part in (SecAggError) must not cost it a training pass
        ep = _load(context, as_int(rec["round"]), _credentials(credentials, context))
        inbox = rec.get("inbox")
        if not isinstance(inbox, bytes):
            raise SecAggError(
                f"the train instruction of SecAgg round {as_int(rec['round'])} carries no share inbox"
            )
        original = msg.content
        msg.content = RecordDict({k: v for k, v in original.items() if k != SECAGG_KEY})
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = original
        if reply.has_error():
            return reply
        ctrl = original.config_records[CONTROL_KEY]
        payload = reply.content.config_records[UPLINK_KEY]["payload"]
        # still on the node: it decodes its own payload, so its codec and error feedback shape what it masks
        update = decompress(
            payload_of(payload), expect_base=(str(ctrl["base-id"]), as_int(ctrl["base-version"]))
        )
        if privacy is not None:
            update = privacy(update, ep.config.round_id, context)
        metrics = reply.content.metric_records["metrics"]
        ep.set_update(
            update,
            as_int(metrics["num-examples"]),
            np.random.default_rng(seeds(seed, ep.config.round_id, context)),
        )
        masked = ep.masked_input(inbox)  # set_update above checked the actual update's size
        _save(context, ep)
        # only the masked input goes back: not the payload, not the weights, not the example count
        out = RecordDict({SECAGG_KEY: ConfigRecord({"message": masked})})
        out["metrics"] = MetricRecord({k: v for k, v in metrics.items() if k != "num-examples"})
        reply.content = out
        return reply

    mod.__name__ = mod.__qualname__ = "secagg_mod"
    return mod


class SecAggStrategy(DeltaStrategy):
    """A :class:`DeltaStrategy` whose round aggregates through SecAgg(+) carried by Flower messages.

    Partner: :func:`secagg_mod` + :func:`add_secagg` on every node. Keyword-only hyperparameters (on top of
    :class:`DeltaStrategy`'s):

    Args:
        server_step: the engine's :class:`~deltaplane.engine.ServerStep` (required): it receives the unmasked
            mean as the round's only update and runs the chain, the downlink and the publisher.
        bits: bits per quantized value; clip_range: per-value clip of the (weight-scaled) update (under
            distributed DP at least clip + 6·σ_d, else a ConfigError: it clips each node's noised values).
        weight_scale: public typical example count (devices scale by ``n/weight_scale``); 0 for an unweighted
            mean; or ``weight_scale(nodes)``, the scale of a round from its sampled node ids (the in-process
            drivers use the mean example count of the round's devices, which the server knows: it is public).
        neighbours: SecAgg+ degree (None: every node masks with every other), for rounds of the expected size:
            each round runs :func:`~deltaplane.aggregation.secagg.round_neighbours` of it for the nodes it
            sampled (the least degree the nodes accept when larger; the complete graph when it reaches every
            node), as every driver does with a run's ``secagg_neighbours``.
        timeout: seconds each protocol stage waits for replies (None: until every node answered).
        authenticated: run authenticated rounds (Bonawitz et al. 2017 §4–6, against a server that substitutes
            keys or shows nodes different survivor sets): the nodes' signed advertisements are forwarded in a
            signed roster, and a consistency stage between the masked inputs and the unmasking collects each
            survivor's signature of the unmasking request and forwards them with it. Every node must be enrolled
            (:data:`NODE_CONFIG_KEYS`); nodes verify, this strategy verifies nothing. An enrolled node refuses a
            round without it, a node without credentials a round with it: the opt-in is the nodes'.
        revocations: under ``authenticated``, the enrollment authority's revocation list (``deltaplane keys
            revoke``): a :class:`~deltaplane.aggregation.secagg.revocation.RevocationList`, or the path of its
            file, re-read at every round's key advertisement so a newer list applies at once. The advertisement
            of a node it revokes is refused, so that node is left out of the roster and the round goes on without
            it, exact; without it nodes holding the list (``secagg-revocations``) refuse the whole roster. The
            list is checked here, at construction, as at every round: a missing or malformed file, or (given
            ``enrollment_authority``) a list that authority did not sign, is a ConfigError; one past its next
            update a ``RevocationsStale``; a file rolled back to a lower number than this process has read from
            it (or that number with other contents) a ``RevocationRollback``, the nodes' rule
            (:func:`~deltaplane.aggregation.secagg.revocation.take_revocations_from_path`). Each round's key
            advertisement carries the list's signed bytes to the nodes, which take it if it is newer than their
            own and their authority signed it (:func:`take_offered_revocations`): a node revoked since its file
            was written sits the round out, and no node needs its file refreshed out of band.
        enrollment_authority: the authority's public key(s) the list is verified under
            (:class:`~deltaplane.aggregation.secagg.identity.TrustedAuthorities`, or the path of
            ``enrollment.ed25519.pub``), as ``serve --secagg-enrollment-authority``. None: the list is used
            unverified (the nodes still verify theirs).
    """

    def __init__(
        self,
        *,
        bits: int = 16,
        clip_range: float = 1.0,
        weight_scale: float | Callable[[list[int]], float] = 0.0,
        neighbours: int | None = None,
        timeout: float | None = None,
        authenticated: bool = False,
        revocations: RevocationList | str | os.PathLike[str] | None = None,
        enrollment_authority: TrustedAuthorities | str | os.PathLike[str] | None = None,
        **kwargs: Any,  # DeltaStrategy's keyword arguments, typed (and checked) by its __init__
    ) -> None:
        super().__init__(**kwargs)
        if revocations is not None and not authenticated:
            raise ConfigError(
                "revocations= refuses the signed key advertisements of revoked nodes; only authenticated rounds "
                "have them: pass authenticated=True (and enroll every node)"
            )
        if self.server_step is None:
            raise ConfigError(
                "SecAggStrategy hands the unmasked mean to the engine's server step; pass server_step="
            )
        #: the public ring parameters; ``encoding.weight_scale`` is 0 when ``weight_scale`` is a callable
        self.encoding = RingEncoding(
            bits=bits, clip_range=clip_range, weight_scale=0.0 if callable(weight_scale) else weight_scale
        )
        from deltaplane.aggregation.dp import DistributedDP

        ddp = self.server_step.aggregator.find(DistributedDP)
        if isinstance(ddp, DistributedDP):  # its range clip acts on each node's noised values: must not bind
            ddp.check_ring_range(clip_range)
        self.weight_scale = weight_scale
        self.neighbours = neighbours
        self.timeout = timeout
        self.authenticated = authenticated
        self.revocations = revocations
        self.enrollment_authority = enrollment_authority
        if enrollment_authority is not None and revocations is None:
            raise ConfigError("enrollment_authority= verifies the revocations= list; pass that list too")
        self._trusted = (
            TrustedAuthorities.from_file(enrollment_authority)
            if isinstance(enrollment_authority, (str, os.PathLike))
            else enrollment_authority
        )
        self._revocations()  # a bad list (malformed, forged, stale, rolled back) fails here, before any round
        #: the nodes' error replies in the current stage (node id → Flower's error reason), named when the
        #: stage cannot close, so the operator sees why the nodes refused (e.g. an authentication mismatch)
        self._refusals: dict[int, str] = {}
        self._grid: Grid | None = None
        self._round: tuple[ServerEndpoint, dict[int, int], int, RingEncoding] | None = None
        self.secagg_bytes: list[int] = []
        #: this round sampled too few nodes for SecAgg under distributed DP (closed without a sum)
        self._short = False

    def _revocations(self) -> RevocationList | None:
        """This round's revocation list: the one given, or its file's contents now (a newer list applies at once),
        verified under ``enrollment_authority`` when given (a ConfigError naming both authorities otherwise).
        A list past its next update is refused (:class:`~deltaplane.aggregation.secagg.errors.RevocationsStale`):
        the round does not start, as every node holding the same list would refuse it; so is a file rolled back
        from the highest list this process has read from it
        (:class:`~deltaplane.aggregation.secagg.errors.RevocationRollback`), as a node would refuse it."""
        rl, trusted = self.revocations, self._trusted
        fix = "the authority issues a current one (`deltaplane keys revoke`) for the strategy and its nodes"
        if rl is None:
            return None
        if not isinstance(rl, RevocationList):
            read = read_server_revocations(rl, trusted, now=time.time(), fix=fix, holder=_HOLDER)
            return take_revocations_from_path(rl, read, holder="this strategy")
        if trusted is not None:
            try:
                trusted.check_revocations(rl.authority, rl.signed_part(), rl.signature, holder=_HOLDER)
            except SecAggAuthError as exc:
                raise ConfigError(f"revocations=: {exc}") from None
        rl.check_current(time.time(), holder="the strategy's", fix=fix)
        return rl

    def _stage(
        self, grid: Grid, server: ServerEndpoint, ids: dict[int, int], records: dict[int, ConfigRecord]
    ) -> int:
        """Send one query stage to ``records``' nodes and feed the replies to the server; returns bytes sent."""
        msgs = [
            Message(RecordDict({SECAGG_KEY: rec}), dst_node_id=node, message_type=QUERY_TYPE)
            for node, rec in records.items()
        ]
        received = 0
        self._refusals = {}
        for reply in grid.send_and_receive(msgs, timeout=self.timeout):
            if reply.has_error():
                self._refusals[reply.metadata.src_node_id] = str(reply.error.reason)
            received += self._take(server, ids, reply)
        return received

    def _close(self, close: Callable[[], _T], what: str) -> _T:
        """Close a stage (``close()``); its :class:`SecAggError` names the nodes' refusals, which say what to fix."""
        try:
            return close()
        except SecAggError as exc:
            if not self._refusals:
                raise
            node, reason = next(iter(sorted(self._refusals.items())))
            raise SecAggError(
                f"{exc} ({what}: {len(self._refusals)} nodes answered with an error, e.g. node {node}: {reason})"
            ) from exc

    def _take(self, server: ServerEndpoint, ids: dict[int, int], reply: Message) -> int:
        if reply.has_error() or SECAGG_KEY not in reply.content:
            return 0  # the node dropped out of this stage
        record = reply.content.config_records.get(SECAGG_KEY)
        data = record.get("message") if record is not None else None
        sender = ids.get(reply.metadata.src_node_id)
        if not isinstance(data, bytes) or sender is None:
            return 0  # not a SecAgg message, or from a node outside the round: one node's fault, it drops out
        try:
            server.receive(data, sender=sender)
        except DeltaplaneError:
            return 0  # late, out of order or malformed: refused, the node has dropped out
        return len(data)

    def _min_inputs(self) -> int:
        """The fewest sampled nodes a round runs SecAgg with: no floor (0) as ever, or under distributed DP (the
        server step holds :class:`~deltaplane.aggregation.dp.DistributedDP`) its m_min, since the server would
        see the unmasked sum of fewer nodes, whose noise is below z·clip, even though it does not publish it."""
        from deltaplane.aggregation.dp import DistributedDP

        step = self.server_step
        ddp = step.aggregator.find(DistributedDP) if step is not None else None
        return ddp.min_contributors if isinstance(ddp, DistributedDP) else 0

    def round_encoding(self, nodes: list[int]) -> RingEncoding:
        """The ring encoding of a round that sampled ``nodes``: ``weight_scale(nodes)`` when it is a callable."""
        if not callable(self.weight_scale):
            return self.encoding
        scale = float(self.weight_scale(nodes)) if nodes else 0.0
        return RingEncoding(bits=self.encoding.bits, clip_range=self.encoding.clip_range, weight_scale=scale)

    def _shared_zeros(self) -> Delta:
        """Zeros shaped like what the nodes mask: the global model less the layers personalization keeps home."""
        keep = self.server_step.local_keys if self.server_step is not None else frozenset()
        assert (
            self._global is not None
        )  # set from the first round's arrays, before a round is sized or summed
        return masked_zeros(self._global, keep)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Key advertisement and share exchange with the sampled nodes, then train instructions with inboxes."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        assert self._global is not None
        nodes = sorted((m.metadata.dst_node_id for m in messages), key=self.device_id)
        self._short = len(nodes) < self._min_inputs()
        if self._short:  # distributed DP, fewer nodes than m_min: no sum, nothing unmasked
            self._grid, self._round = grid, None
            # nothing is sent, but the nodes were sampled: the round reports them, as every driver does
            self._pending_down, self._pending_sampled = 0, len(nodes)
            return []
        if len(nodes) < 2:  # the "sum" of a lone masked input is that input (SecAggConfig refuses it too)
            raise lone_input_error(server_round, len(nodes))
        encoding = self.round_encoding(nodes)
        ids = {node: i for i, node in enumerate(nodes)}
        n = len(nodes)
        degree = round_neighbours(self.neighbours, n)  # for this round's size, as every driver
        group = group_size(degree, n)
        cfg = SecAggConfig(
            num_clients=n,
            threshold=default_threshold(group),
            bits=self.encoding.bits,
            vector_size=encoding.vector_size(self._shared_zeros()),
            neighbours=degree,
            round_id=server_round,
            graph_seed=server_round,
        )
        # distributed DP: never unmask below m_min
        revocations = self._revocations()
        server = ServerEndpoint(
            cfg,
            min_inputs=self._min_inputs(),
            authenticated=self.authenticated,
            revocations=revocations,
        )
        # the list goes to the nodes with the first message of the round, as the service serves it to fleet
        # devices: a node takes it only if its authority signed it and it is newer than its own
        offered = {"revocations": revocations.to_bytes()} if revocations is not None else {}
        enc = json.dumps([encoding.bits, encoding.clip_range, encoding.weight_scale])
        sent = self._stage(
            grid,
            server,
            ids,
            {
                node: ConfigRecord(
                    {
                        "stage": "advertise",
                        "config": json.dumps(cfg.to_dict()),
                        "encoding": enc,
                        "client-id": ids[node],
                        "authenticated": self.authenticated,
                        "secagg-version": MESSAGE_VERSION,  # a node of another version refuses here
                        **offered,
                    }
                )
                for node in nodes
            },
        )
        roster = self._close(server.roster, "key advertisement")
        keyed = [node for node in nodes if ids[node] in server.server.keys]
        sent += self._stage(
            grid,
            server,
            ids,
            {
                node: ConfigRecord({"stage": "share", "roster": roster, "round": server_round})
                for node in keyed
            },
        )
        self._close(server.close_shares, "share exchange")
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if ids[node] not in server.server.share_senders:
                continue  # dropped before masking: no train instruction
            m.content[SECAGG_KEY] = ConfigRecord({"round": server_round, "inbox": server.inbox(ids[node])})
            out.append(m)
        self._grid = grid
        self._round = (server, ids, sent, encoding)
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold the masked inputs, run the unmasking stage, and publish the unmasked weighted mean."""
        if self._short:  # too few nodes for SecAgg under distributed DP: no sum
            step = self.server_step
            assert step is not None
            step.open(server_round, version=self._version, state=self._global)
            self.secagg_bytes.append(0)
            outcome = self.last_outcome = step.close()  # publishes nothing new, spends the round's ε
            return self._take_outcome(server_round, [], outcome, 0)
        assert self._round is not None and self._grid is not None and self._global is not None
        server, ids, sent, encoding = self._round
        self._round = None
        replies = sorted(replies, key=lambda m: self.device_id(m.metadata.src_node_id))
        up_msg = 0
        for m in replies:
            sent += self._take(server, ids, m)
            up_msg += content_bytes(m.content) if not m.has_error() else 0
        step = self.server_step
        assert step is not None
        step.open(server_round, version=self._version, state=self._global)
        for m in replies:
            if m.has_error():  # its cached model is unknown now: send it the full model next time
                self._node_version.pop(m.metadata.src_node_id, None)
                # a node whose ClientApp failed sent no masked input: refused, as in process a device
                # whose client step failed (its masks are recovered from the others' shares)
                step.refuse(self._client_id(m), self._failure(m))
        ok = [m for m in replies if not m.has_error()]  # each holds this round's base model now
        # with no masked input there is nothing to unmask: the step's close refuses the round
        if server.server.uploaded:
            request = server.unmask_request()
            by_id = {i: node for node, i in ids.items()}
            unmask: dict[str, ConfigRecordValues] = {
                "stage": "unmask",
                "request": request,
                "round": server_round,
            }
            if self.authenticated:  # the consistency check: each survivor signs the request it was sent
                sent += self._stage(
                    self._grid,
                    server,
                    ids,
                    {
                        by_id[u]: ConfigRecord(
                            {"stage": "consistency", "request": request, "round": server_round}
                        )
                        for u in server.server.survivors
                    },
                )
                unmask["signatures"] = self._close(server.survivor_signatures, "consistency check")
            sent += self._stage(
                self._grid, server, ids, {by_id[u]: ConfigRecord(unmask) for u in server.server.survivors}
            )
            total = self._close(server.result, "unmasking")
            survivors = list(server.server.survivors)
            mean, _ = encoding.decode_sum(total, count=len(survivors), like=self._shared_zeros())
            # the engine's server step gets the unmasked weighted mean and nothing else: its chain, its downlink
            step.receive_secure_sum(mean, contributors=len(survivors), uplink_bytes=sent)
        self.secagg_bytes.append(sent)
        outcome = self.last_outcome = step.close()  # raises InvalidUpdate when every node was refused
        return self._take_outcome(server_round, ok, outcome, up_msg)
