"""A `deltaplane serve` process with an instrument: run by tests/serve/test_secagg_fleet.py, never imported.

It builds the service exactly as ``deltaplane serve`` does (``create_app`` + uvicorn), wraps it in an ASGI layer
that keeps a copy of every request body, and adds one route, ``POST /__probe/scan``, which searches every byte
the process received *and every object alive in the process* (bytes, arrays and tensors reachable from any
garbage-collected object, including thread stacks' frames) for the byte patterns the test sends.

Usage: python secagg_probe_server.py HOME ADMIN_TOKEN DEVICE_SECRET PORT_FILE
"""

import gc
import socket
import sys

import numpy as np
import torch
import uvicorn
from fastapi import Request

from deltaplane.serve import ServiceConfig, create_app

home, admin_token, device_secret, port_file = sys.argv[1:5]
config = ServiceConfig(
    home=home,
    admin_token=admin_token,
    device_secret=device_secret,
    downlink_codec="identity",
    rate=1e6,
    burst=1_000_000,
    max_examples=1_000,  # the test's devices hold under 60 examples; its 16-bit weighted ring carries 65,535
)
app = create_app(config)
BODIES: list[bytes] = []


async def scan(request: Request) -> dict:
    doc = await request.json()
    patterns = [bytes.fromhex(h) for h in doc["patterns"]]
    skip = {id(patterns), id(doc), *map(id, patterns)}
    found: list[int] = []
    seen: set[int] = set()
    buffers = 0

    def check(buf: bytes) -> None:
        for i, p in enumerate(patterns):
            if i not in found and p in buf:
                found.append(i)

    for body in BODIES:
        check(body)
    gc.collect()

    def visit(r: object) -> None:
        nonlocal buffers
        if id(r) in seen or id(r) in skip:
            return
        seen.add(id(r))
        if isinstance(r, bytes | bytearray) and len(r) >= 32:
            buffers += 1
            check(bytes(r))
        elif isinstance(r, np.ndarray) and r.dtype != object and r.nbytes >= 32:
            buffers += 1
            check(r.tobytes())
        elif isinstance(r, torch.Tensor) and r.device.type == "cpu" and r.numel() * r.element_size() >= 32:
            buffers += 1
            check(r.detach().contiguous().numpy().tobytes())
        elif isinstance(r, tuple | list | dict | set | frozenset) and not gc.is_tracked(r):
            # CPython stops tracking containers of atomic values (a tuple of bytes): walk into them here
            for x in [*r.keys(), *r.values()] if isinstance(r, dict) else list(r):
                visit(x)

    for obj in gc.get_objects():
        visit(obj)
        for r in gc.get_referents(obj):
            visit(r)
    return {"found": sorted(found), "bodies": len(BODIES), "buffers": buffers}


app.add_api_route("/__probe/scan", scan, methods=["POST"])


async def recorder(scope, receive, send):
    if scope["type"] != "http" or scope["path"] == "/__probe/scan":
        return await app(scope, receive, send)
    chunks: list[bytes] = []

    async def spy():
        msg = await receive()
        if msg["type"] == "http.request":
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                BODIES.append(b"".join(chunks))
        return msg

    return await app(scope, spy, send)


sock = socket.socket()
sock.bind(("127.0.0.1", 0))
with open(port_file + ".tmp", "w") as f:
    f.write(str(sock.getsockname()[1]))
import os  # noqa: E402

os.replace(port_file + ".tmp", port_file)
uvicorn.Server(uvicorn.Config(recorder, log_level="warning", access_log=False)).run(sockets=[sock])
