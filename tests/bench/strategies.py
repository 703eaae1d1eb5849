"""First sync per write strategy, each against its own server-bound loop: the same requests, replayed.

For each ``server.write_strategy`` (transaction, batch, single, update-as-create) peersync runs a first sync with
that strategy while a recorder on its HTTP session keeps every request it sends (method, URL, headers, body) and
the thread that sent it. The server-bound side then replays exactly those requests on a reset server with a
plain loop: one thread per thread peersync used (its 4 writers, the main thread, the Patient look-ahead), each
request in the order its thread sent it. No reading, mapping, planning, ledger or answer checking: only the
HTTP exchanges, with no client work beyond the one thing a replay cannot avoid: the server assigns new ids on
the reset server, so a literal ``Type/id`` reference or ``PUT Type/id`` in a recorded request is rewritten to
the id the replayed request that created it got (a regex over the serialized body), and a request waits until
that creating request has been answered (as peersync's request did). update-as-create's deterministic ids and
the transaction's conditional references need no rewriting.

Rates count the program's resources the ledger confirmed (every resource but Provenance), the same numerator
on both sides. See docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests

from connector.ops.logs import new_run_id
from connector.run import RunSummary, Syncer
from connector.wiring import build_client, sync_options

from .common import FHIR_JSON, BenchProgram, Dataset, Timer, load_patients, new_program
from .writes import WriteResult

STRATEGIES = ("transaction", "batch", "single", "update-as-create")
# A literal reference (or request URL) in a serialized body: "Type/id", optionally versioned.
_LITERAL = re.compile(rb'"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})((?:/_history/[0-9]+)?)"')
_WAIT_SECONDS = 600.0  # a replayed request waits at most this long for the request that creates its target


@dataclass
class Call:
    """One HTTP request peersync sent, and the answer (its body is read by the client after the call returns)."""

    thread: int
    method: str
    url: str
    data: bytes | None
    params: Any
    headers: dict[str, str]
    response: requests.Response

    def created(self) -> list[str | None]:
        """The ``Type/id`` of each resource this request wrote, in the order of its entries (None: not a write)."""
        if self.method not in ("POST", "PUT") or not 200 <= self.response.status_code < 300:
            return []
        return created_ids(self.method, self.url, self.response.content,
                           self.response.headers.get("Location") or self.response.headers.get("Content-Location"))


def created_ids(method: str, url: str, content: bytes, location: str | None) -> list[str | None]:
    """``Type/id`` of what a write answer says was written: each entry of a batch/transaction answer, or the one
    resource of a single write."""
    last = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    if method == "POST" and not last[:1].isupper():  # POST to the base URL (".../fhir"): a transaction or batch
        body = orjson.loads(content) if content else {}
        return [_type_and_id((e.get("response") or {}).get("location") or "") for e in body.get("entry") or []]
    if location:
        return [_type_and_id(urlsplit(location).path)]
    body = orjson.loads(content) if content else {}
    return [f"{body['resourceType']}/{body['id']}" if body.get("id") else None]


def _type_and_id(location: str) -> str | None:
    """``Type/id`` from ``Type/id/_history/1`` or ``http://host/fhir/Type/id/_history/1``."""
    parts = [p for p in location.split("/_history/")[0].split("/") if p]
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 and parts[-2][:1].isupper() else None


class Recorder:
    """Keeps every request a FhirClient's session sends (thread-safe: list.append is atomic)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def install(self, session: requests.Session) -> None:
        original = session.request

        def request(method: str, url: str, **kwargs: Any) -> requests.Response:
            response = original(method, url, **kwargs)
            self.calls.append(Call(threading.get_ident(), method, url, kwargs.get("data"), kwargs.get("params"),
                                   dict(kwargs.get("headers") or {}), response))
            return response

        session.request = request  # type: ignore[method-assign]


def with_strategy(program: BenchProgram, strategy: str) -> BenchProgram:
    """The program's config with ``server.write_strategy`` set."""
    text = program.config.read_text(encoding="utf-8")
    program.config.write_text(text.replace("[server]\n", f'[server]\nwrite_strategy = "{strategy}"\n', 1),
                              encoding="utf-8")
    return program


def run_recorded(program: BenchProgram, who: str) -> tuple[WriteResult, RunSummary, list[Call]]:
    """One in-process ``peersync sync`` (as writes.run_peersync) with its requests recorded."""
    from .writes import _resources_of_run

    settings = program.settings()
    client = build_client(settings)
    recorder = Recorder()
    recorder.install(client.session)
    syncer = Syncer(sync_options(settings), client)
    with Timer() as timer:
        summary = syncer.run(new_run_id())
    failed = {k: v for k, v in summary.counts.items() if k not in ("created", "updated", "voided", "unchanged") and v}
    resources = _resources_of_run(settings.sync.ledger, summary.run_id)
    detail = f"outcome {summary.outcome}" + (f", {failed}" if failed else "")
    return (WriteResult(who, timer.seconds, resources, summary.requests, summary.write_requests, detail), summary,
            recorder.calls)


class Replay:
    """The server-bound loop: recorded requests, one thread per recorded thread, literal ids rewritten."""

    def __init__(self, calls: list[Call], seed: dict[str, str]) -> None:
        self.calls = calls
        self.created = [c.created() for c in calls]  # read before timing: the recording's ids
        self.new_ids = dict(seed)  # old "Type/id" -> new "Type/id"
        self.done = {old: threading.Event() for ids in self.created for old in ids if old and old not in seed}
        self.lock = threading.Lock()
        self.threads = 0  # how many threads the last run used (one per recorded thread)

    def _new_id(self, old: str, own: set[str | None]) -> str:
        """The replay's id for a recorded one; waits for the request that creates it, unless it is this one
        (update-as-create's ``PUT Type/{id}``, whose id is the same on both sides)."""
        if old in own:
            return self.new_ids.get(old, old)
        event = self.done.get(old)
        if event is not None and not event.wait(_WAIT_SECONDS):
            raise RuntimeError(f"replay: nothing created {old.split('/')[0]} within {_WAIT_SECONDS:.0f} s")
        return self.new_ids.get(old, old)

    def _rewrite_body(self, data: bytes, own: set[str | None]) -> tuple[bytes, bool]:
        """The body with every recorded literal id replaced by the replay's; whether anything changed."""
        changed = False

        def literal(match: re.Match[bytes]) -> bytes:
            nonlocal changed
            old = f"{match[1].decode()}/{match[2].decode()}"
            if old not in self.done and old not in self.new_ids:
                return match[0]
            new = self._new_id(old, own)
            changed = changed or new != old
            return b'"' + new.encode() + match[3] + b'"'

        return _LITERAL.sub(literal, data), changed

    def _send(self, session: requests.Session, call: Call, created: list[str | None]) -> None:
        url, data, own = call.url, call.data, set(created)
        path = urlsplit(url).path
        parts = path.rsplit("/", 2)
        by_id = call.method == "PUT" and len(parts) == 3 and parts[1][:1].isupper()  # PUT Type/id
        if data is not None:
            data, changed = self._rewrite_body(data, own)
            if changed and not by_id and call.method == "POST" and not parts[-1][:1].isupper():
                data = _ids_from_urls(data)  # a batch updating by id: each resource's id follows its URL
        if by_id:
            old = f"{parts[1]}/{parts[2]}"
            new = self._new_id(old, own)
            if new != old:
                if data is not None:
                    data = data.replace(f'"id":"{parts[2]}"'.encode(), f'"id":"{new.split("/")[1]}"'.encode(), 1)
                url = url.replace(path, path[: -len(old)] + new)
        answer = session.request(call.method, url, data=data, params=call.params,
                                 headers={"Accept": FHIR_JSON, **call.headers}, timeout=600, allow_redirects=False)
        if answer.status_code != call.response.status_code:
            raise RuntimeError(f"replay: {call.method} {urlsplit(call.url).path}: HTTP {answer.status_code}, "
                               f"recorded {call.response.status_code}: {answer.text[:300]}")
        if any(created):
            now = created_ids(call.method, url, answer.content,
                              answer.headers.get("Location") or answer.headers.get("Content-Location"))
            with self.lock:
                for old, new in zip(created, now, strict=False):
                    if old and new:
                        self.new_ids.setdefault(old, new)
            for old in created:
                if old and old in self.done:
                    self.done[old].set()

    def run(self) -> float:
        """Replay everything; the seconds it took."""
        by_thread: dict[int, list[int]] = {}
        for index, call in enumerate(self.calls):
            by_thread.setdefault(call.thread, []).append(index)
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=len(by_thread) * 2, pool_maxsize=len(by_thread) * 2)
        session.mount("http://", adapter)
        errors: list[BaseException] = []

        def worker(indexes: list[int]) -> None:
            try:
                for index in indexes:
                    self._send(session, self.calls[index], self.created[index])
            except BaseException as exc:  # noqa: BLE001 - reported by run(), and the others must not wait for it
                errors.append(exc)
                for event in self.done.values():
                    event.set()

        threads = [threading.Thread(target=worker, args=(indexes,), daemon=True) for indexes in by_thread.values()]
        with Timer() as timer:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        session.close()
        self.threads = len(threads)
        if errors:
            raise errors[0]
        return timer.seconds


def replay(program: BenchProgram, calls: list[Call], resources: int) -> WriteResult:
    """The recorded requests on a reset server: the program's Patients loaded again (not timed), then replayed."""
    again = dataclasses.replace(program, patient_ids={})
    load_patients(again)
    seed = {f"Patient/{program.patient_ids[mrn]}": f"Patient/{new}" for mrn, new in again.patient_ids.items()
            if new and program.patient_ids.get(mrn)}
    loop = Replay(calls, seed)
    seconds = loop.run()
    writes = sum(1 for c in calls if c.method in ("POST", "PUT", "PATCH", "DELETE"))
    return WriteResult("server-bound", seconds, resources, len(calls), writes, f"{loop.threads} threads")


def compare(data: Dataset, base_url: str, strategy: str, *, concurrency: int, fresh: Callable[[], None],
            log: Callable[[str], None]) -> dict[str, Any]:
    """peersync and its server-bound replay in the order peersync, server-bound, server-bound, peersync (the
    first peersync run is the one replayed), each on a reset server; the faster run of each side counts."""
    label = {"transaction": "st", "batch": "sb", "single": "ss", "update-as-create": "su"}[strategy]
    best: dict[str, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []
    recorded: tuple[BenchProgram, list[Call], int] | None = None
    for side in ("peersync", "server_bound", "server_bound", "peersync"):
        fresh()
        if side == "peersync":
            program = with_strategy(new_program(data, base_url, label, concurrency=concurrency), strategy)
            result, summary, calls = run_recorded(program, f"peersync {strategy}")
            run = vars(result) | {"phases": getattr(summary, "phases", {}), "outcome": str(summary.outcome)}
            if recorded is None:
                recorded = (program, calls, result.resources)
        else:
            assert recorded is not None
            result = replay(*recorded)
            run = vars(result)
        log(f"  {strategy} {side.replace('_', '-')} {result}")
        history.append({"side": side, "seconds": result.seconds, "per_second": result.per_second})
        if side not in best or result.per_second > best[side]["resources"] / best[side]["seconds"]:
            best[side] = run
    return {"strategy": strategy, "peersync": best["peersync"], "server_bound": best["server_bound"],
            "rounds": history}


def _ids_from_urls(data: bytes) -> bytes:
    """A batch Bundle whose ``PUT Type/id`` entries were rewritten: each resource's id set to its URL's."""
    bundle = orjson.loads(data)
    for entry in bundle.get("entry") or []:
        request, resource = entry.get("request") or {}, entry.get("resource")
        url = request.get("url", "")
        if request.get("method") == "PUT" and "?" not in url and isinstance(resource, dict):
            resource["id"] = url.rsplit("/", 1)[-1]
    return orjson.dumps(bundle)


# A 32-hex code in a recorded body: a change-set tag (and its ifNoneExist), the only such values in the program
_CODE = re.compile(rb"[0-9a-f]{32}")


def replay_changes(calls: list[Call], marker: bytes, again: bytes) -> WriteResult:
    """The server-bound loop of a re-sync: its recorded requests sent again to the same server, one thread per
    recorded thread, with the changed text (``marker``) changed once more (``again``) and every change-set tag new,
    so that the server does the same work (a new version of each changed resource, a new Provenance per
    change-set) without any of peersync's. Reads are sent as recorded."""
    codes: dict[bytes, bytes] = {}

    def new_code(match: re.Match[bytes]) -> bytes:
        return codes.setdefault(match[0], uuid.uuid4().hex.encode())

    def changed(call: Call) -> Call:
        if call.data is None:
            return call
        return dataclasses.replace(call, data=_CODE.sub(new_code, call.data.replace(marker, again)),
                                   url=_CODE.sub(new_code, call.url.encode()).decode())

    loop = Replay([changed(call) for call in calls], {})
    seconds = loop.run()
    writes = sum(1 for c in calls if c.method in ("POST", "PUT", "PATCH", "DELETE"))
    return WriteResult("server-bound", seconds, 0, len(calls), writes, f"{loop.threads} threads")
