"""The SecAgg messages on the wire: exact round trips, and strict, bounded decoding with typed errors."""

import struct
import time

import numpy as np
import pytest

from deltaplane.aggregation.secagg import (
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggOrderError,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    decode_message,
)
from deltaplane.errors import ConfigError, DecodeError, DeltaplaneError

CFG = SecAggConfig(num_clients=5, threshold=3, bits=8, vector_size=33, round_id=3)


def _messages() -> list:
    rb = np.random.default_rng(0).bytes
    clients = {u: SecAggClient(u, CFG, randbytes=rb) for u in range(5)}
    server = SecAggServer(CFG)
    adv = [c.advertise_keys() for c in clients.values()]
    for m in adv:
        server.receive_keys(m)
    roster = server.roster()
    shares = [c.share_keys(roster) for c in clients.values()]
    for m in shares:
        server.receive_shares(m)
    server.close_shares()
    codes = np.arange(33, dtype=np.uint32)
    masked = [c.masked_input(server.inbox(u), codes) for u, c in clients.items()]
    for m in masked:
        server.receive_masked_input(m)
    req = server.unmask_request()
    resp = clients[2].unmask(req)
    return [adv[0], roster, shares[1], server.inbox(4), masked[3], req, resp]


@pytest.mark.parametrize("i", range(7))
def test_every_message_round_trips_exactly(i: int) -> None:
    msg = _messages()[i]
    data = msg.to_bytes()
    assert len(data) <= type(msg).max_bytes(CFG)
    back = type(msg).from_bytes(data, CFG)
    assert back == msg and back.to_bytes() == data
    assert decode_message(data, CFG) == msg
    # what the server counts as uploaded is the encoding's length, for sent and received messages alike
    assert msg.wire_size() == back.wire_size() == len(data)


def test_a_decoded_masked_input_is_a_read_only_view_of_the_message() -> None:
    masked = next(m for m in _messages() if isinstance(m, MaskedInput))
    data = masked.to_bytes()
    back = MaskedInput.from_bytes(data, CFG)
    assert bytes(back.packed) == bytes(masked.packed) == data[-len(masked.packed) :]
    for packed in (back.packed, masked.packed):  # neither side can change what was sent or received
        with pytest.raises(TypeError):
            memoryview(packed)[0] = 1
    # a ciphertext of the wrong length is refused when the message is sized, as when it is encoded
    bad = ShareKeys(3, 1, {2: b"\0" * 10})
    for f in (bad.to_bytes, bad.wire_size):
        with pytest.raises(DecodeError, match="not 160"):
            f()


def test_masked_input_is_exactly_the_additive_masking_size() -> None:
    masked = next(m for m in _messages() if isinstance(m, MaskedInput))
    # 33 values at ring_bits = 8 + ceil(log2 5) = 11 bits: 46 bytes, plus the 10-byte header and the id
    assert CFG.ring_bits == 11 and len(masked.packed) == 46 and len(masked.to_bytes()) == 10 + 4 + 46


def test_strict_decoding_refuses_malformed_messages_with_typed_errors() -> None:
    adv, roster, _shares, _inbox, masked, req, resp = (m.to_bytes() for m in _messages())
    cases = {
        "shorter than": b"DPS",
        "magic": b"XXXX" + adv[4:],
        "version 9": adv[:4] + b"\x09" + adv[5:],
        "unknown SecAgg message kind": adv[:5] + b"\x63" + adv[6:],
        "truncated": adv[:-1],
        "trailing": UnmaskRequest(3, (0, 1, 2), ()).to_bytes() + b"\0",
        "exceeds": masked + b"\0" * 64,
        "not a client": adv[:10] + struct.pack(">I", 5) + adv[14:],
        "at most 5": roster[:10] + struct.pack(">I", 2**31) + roster[14:],
        "strictly increasing": req[:14] + req[18:22] + req[14:18] + req[22:],
        "listed as both": UnmaskRequest(3, (0, 1, 2), (2,)).to_bytes(),
        "differ from the client": ShareKeys(3, 1, {1: b"\0" * 160}).to_bytes(),
        "share value out of the field": resp[:22] + b"\xff" * 66 + resp[88:],
    }
    for needle, data in cases.items():
        with pytest.raises(DecodeError, match=needle):
            decode_message(data, CFG)
    with pytest.raises(SecAggOrderError, match="round 3"):
        decode_message(adv, SecAggConfig(num_clients=5, threshold=3, bits=8, vector_size=33, round_id=4))
    with pytest.raises(DecodeError, match="expected a MaskedInput"):
        MaskedInput.from_bytes(adv, CFG)
    with pytest.raises(DecodeError, match="bytes"):
        decode_message("text", CFG)  # type: ignore[arg-type]


def test_random_mutations_decode_or_fail_typed_and_fast() -> None:
    rng = np.random.default_rng(5)
    originals = [m.to_bytes() for m in _messages()]
    start = time.perf_counter()
    outcomes = {"ok": 0, "typed": 0}
    for i in range(3000):
        data = bytearray(originals[i % len(originals)])
        for _ in range(int(rng.integers(1, 4))):
            op = rng.integers(3)
            pos = int(rng.integers(0, len(data)))
            if op == 0:
                data[pos] = int(rng.integers(256))
            elif op == 1:
                del data[pos : pos + int(rng.integers(1, 9))]
            else:  # overwrite a 4-byte field with a boundary value (counts, ids)
                val = int(rng.choice([0, 1, 4, 5, 2**31, 2**32 - 1]))
                data[pos : pos + 4] = struct.pack(">I", val)
        try:
            decode_message(bytes(data), CFG)
            outcomes["ok"] += 1
        except DeltaplaneError:
            outcomes["typed"] += 1
    assert outcomes["typed"] > 1000 and time.perf_counter() - start < 20


def test_config_travels_as_json_and_is_checked() -> None:
    assert SecAggConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ConfigError, match="exactly the fields"):
        SecAggConfig.from_dict({**CFG.to_dict(), "extra": 1})
    with pytest.raises(ConfigError, match="'bits'"):
        SecAggConfig.from_dict({**CFG.to_dict(), "bits": "8"})
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig.from_dict({**CFG.to_dict(), "threshold": 1})
