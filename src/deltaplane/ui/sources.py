"""Where the dashboard's numbers come from: run reports on disk, the registry, and the live fleet.

Every page is rendered from these three read-only views, so the dashboard shows exactly what ``report.json``,
the registry database and the service hold — it computes nothing of its own beyond sorting and differences.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaplane.errors import ConfigError, DeltaplaneError, IntegrityError, NotFound, SignatureError
from deltaplane.registry.store import Artifact, Registry
from deltaplane.report.writer import load_report

__all__ = [
    "FleetSource",
    "Listing",
    "RegistryUnavailable",
    "RegistryView",
    "RunRef",
    "RunsSource",
    "check_report",
    "config_diff",
]

#: A callable returning the live fleet snapshot (see :meth:`deltaplane.serve.app.ServiceState.fleet_snapshot`),
#: or None when the dashboard runs without a service (``deltaplane ui``).
FleetSource = Callable[[], Mapping[str, Any]]

#: Reports larger than this are not loaded (a dashboard must stay responsive whatever lies in the folder).
MAX_REPORT_BYTES = 64 << 20
#: At most this many report.json files are listed (newest first).
MAX_REPORTS = 500
#: Folders more than this many levels below the runs folder are not searched: ``runs/a/b/c/d/e/f/report.json`` is
#: the deepest report listed.
MAX_RUNS_DEPTH = 6
#: The search for reports stops after this many folder entries (files and folders alike), and the pages say so:
#: every overview is a fresh search, and a runs folder holding a dataset or a home folder must not stall it.
MAX_WALK_ENTRIES = 100_000
#: Rows per page of the long tables (runs, a model's versions, tag moves and decisions).
PAGE_ROWS = 50


@dataclass(frozen=True)
class RunRef:
    """One run inside one report: ``report`` is the report folder relative to the runs root."""

    report: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.report}::{self.name}"


@dataclass(frozen=True)
class Listing:
    """The runs table: one row per run of every usable report, and (folder, why) for each report left out."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    #: Sentences on what the search for reports could not cover (stopped at its entry limit, unreadable
    #: folders); empty when it saw the whole folder down to :data:`MAX_RUNS_DEPTH`.
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Search:
    """What one search of the runs folder found: (mtime_ns, size, path) of each report.json, whether it stopped
    at :data:`MAX_WALK_ENTRIES`, (folder, why) of each folder it could not read, how many folders it did not
    enter because they lie deeper than :data:`MAX_RUNS_DEPTH`, (path, size) of each report.json larger than
    :data:`MAX_REPORT_BYTES`, and the runs folder itself when it is not a folder (a typo in ``--runs``, or the
    default, relative ``runs`` looked for from another folder), so the page says why it lists nothing."""

    found: list[tuple[int, int, Path]]
    cut: bool
    unreadable: list[tuple[str, str]]
    too_deep: int = 0
    too_large: list[tuple[Path, int]] = field(default_factory=list)
    missing: Path | None = None


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_report(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """``doc`` if it has the shape the pages read, else :class:`ConfigError` naming the first field to fix.

    ``load_report`` checks only the format tag; a report edited by hand or written by another tool may still
    lack ``runs`` or a run's ``name``, and one odd file must not take the overview down.
    """

    def bad(what: str) -> ConfigError:
        return ConfigError(f"report {where!r} is malformed: {what}")

    runs = doc.get("runs")
    if not isinstance(runs, list):
        raise bad(f"'runs' must be a list of runs, not {type(runs).__name__}")
    summary = doc.get("summary", [])
    if not isinstance(summary, list) or not all(isinstance(x, dict) for x in summary):
        raise bad("'summary' must be a list of objects")
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise bad(f"runs[{i}] must be an object, not {type(run).__name__}")
        if not isinstance(run.get("name"), str) or not run["name"]:
            raise bad(f"runs[{i}] has no 'name' string")
        for key in ("config", "final"):
            if not isinstance(run.get(key, {}), dict):
                raise bad(f"run {run['name']!r}: '{key}' must be an object")
        rounds = run.get("rounds", [])
        if not isinstance(rounds, list):
            raise bad(f"run {run['name']!r}: 'rounds' must be a list")
        for j, rnd in enumerate(rounds):
            if not isinstance(rnd, dict) or not _is_number(rnd.get("round")):
                raise bad(f"run {run['name']!r}: rounds[{j}] needs a numeric 'round'")
    return doc


class RunsSource:
    """The runs under a folder: every ``report.json`` below ``root`` outside hidden folders (a run being written,
    see :func:`_hidden`) and linked folders, at most :data:`MAX_RUNS_DEPTH` levels down and within
    :data:`MAX_WALK_ENTRIES` entries (see :func:`_search`), at most :data:`MAX_REPORTS`."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        # path -> ((mtime_ns, size), the report's rows or why it was left out): a listing re-parses only the
        # reports that changed since the last view (each may be up to MAX_REPORT_BYTES of JSON)
        self._parsed: dict[Path, tuple[tuple[int, int], list[dict[str, Any]] | str]] = {}
        self._lock = threading.Lock()

    def reports(self) -> list[tuple[str, Path]]:
        """(relative folder, path) of each report.json, newest first."""
        return [(rel, path) for rel, path, _ in self._found(_search(self.root))]

    def _found(self, search: _Search) -> list[tuple[str, Path, tuple[int, int]]]:
        """(relative folder, path, (mtime_ns, size)) of each report.json ``search`` found, newest first."""
        root = self.root
        if root is None:
            return []
        out = []
        for mtime_ns, size, path in heapq.nlargest(MAX_REPORTS, search.found):
            rel = path.parent.relative_to(root).as_posix()
            out.append((rel or ".", path, (mtime_ns, size)))
        return out

    def load(self, report: str) -> dict[str, Any]:
        """The report document of folder ``report`` (relative to the root); NotFound outside the root."""
        if self.root is None:
            raise NotFound("this dashboard was started without a runs folder")
        missing = NotFound(f"no report {report!r} under {self.root}")
        try:
            path = (self.root / report / "report.json").resolve()
            if not path.is_relative_to(self.root) or _hidden(Path(report)) or not path.is_file():
                raise missing
            size = path.stat().st_size
        except (OSError, ValueError):  # a NUL byte, a name too long for the filesystem: no such report
            raise missing from None
        if size > MAX_REPORT_BYTES:
            raise ConfigError(f"report {report!r} is larger than {MAX_REPORT_BYTES} bytes")
        return check_report(load_report(path), report)

    def run(self, ref: RunRef) -> tuple[dict[str, Any], dict[str, Any]]:
        """(report document, run) for ``ref``."""
        doc = self.load(ref.report)
        for run in doc["runs"]:
            if run.get("name") == ref.name:
                return doc, run
        raise NotFound(
            f"report {ref.report!r} has no run {ref.name!r}; runs: {[r['name'] for r in doc['runs']]}"
        )

    def listing(self) -> Listing:
        """One row per run of every usable report (headline figures for the runs table), and the reports left
        out with the reason, so a malformed file is shown as such instead of breaking the page."""
        rows: list[dict[str, Any]] = []
        skipped: list[tuple[str, str]] = []
        search = _search(self.root)
        found = self._found(search)
        for rel, path, stamp in found:
            if not self._inside(path):  # as load() refuses it: its run pages could not be opened
                skipped.append((rel, "report.json is a link to a file outside the runs folder"))
                continue
            with self._lock:
                cached = self._parsed.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, _rows(rel, check_report(load_report(path), rel)))
                except DeltaplaneError as exc:
                    cached = (stamp, str(exc))
                with self._lock:
                    self._parsed[path] = cached
            if isinstance(cached[1], str):
                skipped.append((rel, cached[1]))
            else:
                rows.extend(cached[1])
        for (
            path,
            size,
        ) in search.too_large:  # never read (each view stays quick), but not passed over silently
            rel = path.parent.relative_to(self.root).as_posix() if self.root is not None else str(path)
            skipped.append(
                (
                    rel or ".",
                    f"report.json is {size:,} bytes, more than the {MAX_REPORT_BYTES:,} a dashboard loads",
                )
            )
        with self._lock:  # forget reports that are gone (the cache never outgrows MAX_REPORTS by much)
            keep = {path for _, path, _ in found}
            for path in [p for p in self._parsed if p not in keep]:
                del self._parsed[path]
        return Listing(rows, skipped, _notes(search))

    def _inside(self, path: Path) -> bool:
        """Whether ``path`` (found under the root) still lies under it once its links are followed."""
        try:
            return self.root is not None and path.resolve().is_relative_to(self.root)
        except (OSError, ValueError):
            return False


def _search(root: Path | None) -> _Search:
    """Every report.json in ``root`` and its folders down to :data:`MAX_RUNS_DEPTH` levels, outside hidden
    folders (see :func:`_hidden`), stopping after :data:`MAX_WALK_ENTRIES` folder entries.

    Breadth first, so a search cut short has still seen the shallow folders, where runs usually are. A linked
    folder is never entered (a link to ``/`` or to its own parent would make the search endless or
    repetitive), but a linked ``report.json`` file is listed (:meth:`RunsSource.listing` then leaves it out if
    it points outside the root). A folder that cannot be read is recorded and passed over.
    """
    found: list[tuple[int, int, Path]] = []
    unreadable: list[tuple[str, str]] = []
    too_large: list[tuple[Path, int]] = []
    if root is None:
        return _Search(found, False, unreadable)
    if not root.is_dir():
        return _Search(found, False, unreadable, missing=root)
    examined = too_deep = 0
    queue: deque[tuple[str, int]] = deque([(str(root), 0)])
    while queue:
        folder, depth = queue.popleft()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    examined += 1
                    if examined > MAX_WALK_ENTRIES:
                        return _Search(found, True, unreadable, too_deep, too_large)
                    if entry.name.startswith("."):  # a run being written, or one on its way out
                        continue
                    try:
                        if entry.name == "report.json" and entry.is_file():  # follows a link to a file
                            st = entry.stat()
                            if st.st_size <= MAX_REPORT_BYTES:
                                found.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
                            else:
                                too_large.append((Path(entry.path), st.st_size))
                        elif entry.is_dir(follow_symlinks=False):
                            if depth < MAX_RUNS_DEPTH:
                                queue.append((entry.path, depth + 1))
                            else:
                                too_deep += 1
                    except OSError:  # gone since it was listed, or a dangling link: nothing to list
                        continue
        except (
            FileNotFoundError,
            NotADirectoryError,
        ):  # removed or replaced since it was listed: nothing there
            continue
        except OSError as exc:  # unreadable (permissions, I/O): say so, or its runs would vanish unexplained
            rel = Path(folder).relative_to(root).as_posix()
            unreadable.append((rel, exc.strerror or type(exc).__name__))
    return _Search(found, False, unreadable, too_deep, too_large)


def _notes(search: _Search) -> list[str]:
    """The sentences the pages show for what ``search`` could not cover."""
    notes = []
    if search.missing is not None:
        notes.append(
            f"The runs folder {search.missing} does not exist (or is not a folder), so no runs are listed. "
            "deltaplane run -o OUT writes OUT/report.json: start the dashboard with --runs naming the folder "
            "that holds those run folders (a relative --runs, as the default runs, is taken from the folder the "
            "dashboard was started in)."
        )
    if search.cut:
        notes.append(
            f"The search for report.json stopped after {MAX_WALK_ENTRIES:,} files and folders (the limit that "
            "keeps every view quick), so runs further into the runs folder may be missing from this page. Point "
            "--runs at a smaller folder that holds only run outputs."
        )
    if search.too_deep:
        notes.append(
            f"{search.too_deep:,} folder(s) lie more than {MAX_RUNS_DEPTH} levels below the runs folder and were not "
            "searched, so runs in them are not listed. Point --runs at a folder nearer to them."
        )
    if len(search.found) > MAX_REPORTS:
        notes.append(
            f"Only the newest {MAX_REPORTS} of the {len(search.found):,} reports in the runs folder are listed. "
            "Point --runs at a smaller folder, or move older runs out of it."
        )
    if search.unreadable:
        shown = "; ".join(f"{rel} ({why})" for rel, why in search.unreadable[:5])
        more = f"; and {len(search.unreadable) - 5} more" if len(search.unreadable) > 5 else ""
        notes.append(
            f"{len(search.unreadable)} folder(s) under the runs folder could not be read, so runs in them are "
            f"not listed: {shown}{more}."
        )
    return notes


def _hidden(rel: Path) -> bool:
    """Whether a folder (relative to the runs root) is or is under a hidden one. ``deltaplane run -o OUT`` (and
    merge, deploy) write into a hidden sibling ``.OUT.*`` and rename it into place when complete, and the
    replaced output passes through one on its way out: listing those showed a half-written run, or a duplicate
    of the old one, as a report."""
    return any(part.startswith(".") and part not in (".", "..") for part in rel.parts)


def _rows(rel: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs-table rows of one checked report."""
    summary = {s.get("name"): s for s in doc.get("summary", [])}
    rows = []
    for run in doc["runs"]:
        final = run.get("final", {})
        s = summary.get(run["name"], {})
        rows.append(
            {
                "report": rel,
                "name": run["name"],
                "title": doc.get("title", ""),
                "codec": s.get("codec", run.get("config", {}).get("codec", "?")),
                "rounds": len(run.get("rounds", [])),
                "test_accuracy": final.get("test_accuracy"),
                "epsilon": final.get("epsilon"),
                "uplink_bytes": final.get("cumulative_uplink_bytes"),
                "downlink_bytes": final.get("cumulative_downlink_bytes"),
                "stopped": run.get("stopped"),
                "wall_time_s": run.get("wall_time_s"),
            }
        )
    return rows


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, value in a, value in b) for every config field whose values differ (nested keys dotted)."""
    fa, fb = _flatten(a), _flatten(b)
    missing = object()
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            rows.append((key, None if va is missing else va, None if vb is missing else vb))
    return rows


class RegistryUnavailable(ConfigError):
    """The registry cannot be opened or read (``registry.json`` missing, a corrupt ``registry.db``): the pages
    say so with the cause, as a 503, instead of failing with a bare 500."""


@contextmanager
def _readable(home: Path | None) -> Iterator[None]:
    try:
        yield
    except NotFound:
        raise
    except (IntegrityError, SignatureError) as exc:
        # tags, tag history, withdrawals, or an evaluation/verdict row edited outside the registry: show none as fact
        raise RegistryUnavailable(
            f"the registry at {home} does not match its signed state log: {exc} (the operator should run "
            "`deltaplane registry verify` and restore the registry from a backup)"
        ) from exc
    except (ConfigError, sqlite3.DatabaseError) as exc:
        if isinstance(exc, RegistryUnavailable):
            raise
        raise RegistryUnavailable(
            f"the registry at {home} cannot be read: {exc} (the operator should run `deltaplane registry verify`)"
        ) from exc


class RegistryView:
    """Read-only questions the dashboard asks of a registry (opened lazily: it may not exist yet)."""

    def __init__(self, home: str | os.PathLike[str] | None) -> None:
        self.home = Path(home) if home is not None else None
        self._registry: Registry | None = None
        # versions are immutable: a signature checked once stays checked (keyed by hash and signature)
        self._checked: dict[tuple[str, str], bool] = {}

    @property
    def exists(self) -> bool:
        """Whether ``home`` holds a registry (``deltaplane registry init`` has made its database)."""
        return self.home is not None and (self.home / "registry.db").exists()

    @property
    def registry(self) -> Registry | None:
        if self._registry is None and self.exists:
            with _readable(self.home):
                self._registry = Registry(self.home)
        return self._registry

    def models(self, *, page: int = 1, per_page: int = PAGE_ROWS) -> tuple[list[dict[str, Any]], int]:
        """(one row per model of page ``page``, how many models in all) for the registry table: only the page's
        models are read; :class:`RegistryUnavailable` when the registry cannot be read."""
        with _readable(self.home):
            return self._models(page, per_page)

    def _models(self, page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
        reg = self.registry
        if reg is None:
            return [], 0
        names = reg.models()
        rows = []
        for model in names[(page - 1) * per_page : page * per_page]:
            versions = reg.versions(model)
            rows.append(
                {
                    "model": model,
                    "versions": sum(1 for v in versions if v.kind == "model"),
                    "deltas": sum(1 for v in versions if v.kind != "model"),
                    "latest": max((v.number for v in versions if v.kind == "model"), default=None),
                    "tags": reg.tags(model, verify=True),
                }
            )
        return rows, len(names)

    def model(self, model: str, *, page: int = 1, per_page: int = PAGE_ROWS) -> dict[str, Any]:
        """Everything the model page shows: versions (newest first, page ``page`` of ``per_page``; only those
        are checked and looked up), tags and their history (newest first), decisions, governance."""
        with _readable(self.home):
            return self._model(model, page, per_page)

    def _model(self, model: str, page: int, per_page: int) -> dict[str, Any]:
        reg = self.registry
        if reg is None or model not in reg.models():
            raise NotFound(f"no model {model!r} in the registry")
        versions = reg.versions(model)
        # verified against the registry's signed state log: an edited tag or a deleted withdrawal is an error
        withdrawn = reg.withdrawn_cohorts(verify=True)
        tags = reg.tags(model, verify=True)
        history = sorted(
            ((t, h) for t in tags for h in reg.tag_history(model, t, verify=True)),
            key=lambda th: -(th[1].get("at") or 0),
        )
        newest_first = sorted(versions, key=lambda v: v.number, reverse=True)
        shown = newest_first[(page - 1) * per_page : page * per_page]
        rows = []
        lineage_memo: dict[str, set[str]] = {}  # the page's versions share their lineage: walk it once
        for v in shown:
            rows.append(
                {
                    "artifact": v,
                    "signature_ok": self._signature_ok(reg, v),
                    "evaluations": reg.evaluations(v),
                    "governance_problems": reg.governance_problems(v, memo=lineage_memo) if withdrawn else [],
                    "tags": sorted(t for t, n in tags.items() if n == v.number and v.kind == "model"),
                }
            )
        return {
            "model": model,
            "versions": rows,
            "version_count": len(versions),
            "tags": tags,
            "history": history,
            "decisions": reg.promotion_decisions(model),
            "withdrawn": sorted(withdrawn),
        }

    def _signature_ok(self, reg: Registry, art: Artifact) -> bool:
        key = (art.sha256, art.signature)
        if key not in self._checked:
            try:
                reg.read(art, verify=True)
                self._checked[key] = True
            except DeltaplaneError:
                self._checked[key] = False
        return self._checked[key]


def finite(x: Any) -> bool:
    """True for a real, finite number (what a chart may plot)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
