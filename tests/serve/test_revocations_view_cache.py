"""The fleet page reads the service's revocation list again only when the file (or the key, or the held marks)
changed: an unchanged list of up to ~530 KB is neither re-read nor re-verified on every view."""

from __future__ import annotations

import os

from tests.serve.test_revocations_dashboard import authority, field, fleet_html, keys_revoke, panel

import deltaplane.serve.revocation_routes as routes

__all__ = ["authority"]  # the fixture, imported for the tests below


def _counting(monkeypatch) -> list[str]:
    """Every read of the list file through the loader the service uses, by path."""
    reads: list[str] = []
    real = routes.read_server_revocations

    def read(path, *args, **kw):
        reads.append(os.fspath(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(routes, "read_server_revocations", read)
    return reads


def test_an_unchanged_list_is_read_once_and_a_rewritten_one_at_the_next_view(
    service_factory, authority, tmp_path, monkeypatch
) -> None:
    """Before, each view of /ui/fleet read and verified the file again (3 views: 3 reads); now the first view
    reads it and the next ones show the same panel from that reading, until `keys revoke` replaces the file (a
    new inode) or it is written in place (a new mtime): then the next view shows the new list."""
    _, key, pub = authority
    out = tmp_path / "revoked.bin"
    keys_revoke(key, out, "--device", 4)
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    reads = _counting(monkeypatch)
    first = panel(fleet_html(svc))
    assert reads == [str(out)] and first[0] == "current" and field(fleet_html(svc), "sequence") == "1"
    for _ in range(3):
        assert panel(fleet_html(svc)) == first  # the same panel (its "next update in" is computed per view)
    assert reads == [str(out)]

    keys_revoke(key, out, "--device", 3)  # atomic: a new file under the same name
    page = fleet_html(svc)
    assert len(reads) == 2 and field(page, "sequence") == "2" and field(page, "revoked") == "2"
    fleet_html(svc)
    assert len(reads) == 2

    data = out.read_bytes()
    with open(out, "r+b") as f:  # the same bytes written in place: same inode and size, a new mtime
        f.write(data)
    st = out.stat()
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert field(fleet_html(svc), "sequence") == "2" and len(reads) == 3


def test_an_invalid_list_keeps_its_error_until_the_file_is_fixed(
    service_factory, authority, tmp_path, monkeypatch
) -> None:
    """A file that does not read is shown as invalid, with the loader's error, once read; a good list written
    over it is shown at the next view."""
    _, key, pub = authority
    out = tmp_path / "revoked.bin"
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    out.write_bytes(b"not a revocation list")
    reads = _counting(monkeypatch)
    state, body = panel(fleet_html(svc))
    assert state == "invalid" and panel(fleet_html(svc)) == (state, body) and len(reads) == 1
    keys_revoke(key, tmp_path / "good.bin", "--device", 1)
    os.replace(tmp_path / "good.bin", out)
    assert panel(fleet_html(svc))[0] == "current" and len(reads) == 2
