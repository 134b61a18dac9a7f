"""The core of the local ClearML API: the one registry of endpoints, the dispatcher, the error.

Every endpoint is a function ``handler(api, body) -> data`` registered with :func:`endpoint`
under its ClearML name ``service.action``; the services live one module each in
:mod:`stepwise.clearml_server.services` (after clearml-server's ``apiserver/services/``), and
:func:`stepwise.clearml_server.services.create_api` builds an :class:`Api` with all of them.
The body is the request's JSON object (``body="lines"``: a list, one JSON value per line, as
``events.add_batch`` sends; ``body="none"``: not read). The answer is the ``data`` part of
ClearML's envelope; :class:`ApiError` becomes a ClearML-format error.

Shared here: the ``*.get_all``/``*.get_by_id`` look-ups (:func:`register_lookups`) and the
``*_many`` batch form (:func:`register_batch`), both registered through :func:`endpoint`, and
the query rules of ``get_all`` (:func:`query`). Documents carry every field the SDK's response
schemas declare, with the declared types.
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from stepwise.clearml_server.store import Document, Store

try:  # the stdlib's own parser of regular expressions (for name_pattern)
    from re import _parser as _sre_parser  # type: ignore[attr-defined]
except ImportError:  # Python < 3.11
    import sre_parse as _sre_parser  # type: ignore[no-redef]

API_VERSION = "2.23"
SERVER_VERSION = "1.17.0"
USER_ID = "stepwise-local-user"
COMPANY_ID = "stepwise-local"
ARCHIVED = "archived"
HIDDEN = "hidden"
DEVELOPMENT = "development"
HIDEABLE = ("project", "task")
INVALID_ID_SUBCODE = {"task": 101, "model": 201, "project": 401, "queue": 701}

# Fields that name an entity or carry its name: a string (or null) wherever they are sent; a
# look-up (``*.get*``) may send a list of strings instead. Checked before any handler runs, so a
# wrong type is a 400 and never reaches a stored document or a page.
STRING_FIELDS = ("id", "name", "project", "task", "parent", "model", "queue", "worker", "comment")
INTEGER_FIELDS = ("iteration", "last_iteration", "page", "page_size", "batch_size", "iters")

Handler = Callable[["Api", Any], dict[str, Any]]
BodyKind = Literal["json", "lines", "none"]


class ApiError(Exception):
    """An error answered in ClearML's format (HTTP status, subcode, message)."""

    def __init__(self, code: int, subcode: int, message: str) -> None:
        super().__init__(message)
        self.code, self.subcode, self.message = code, subcode, message


@dataclass(frozen=True)
class Endpoint:
    """One implemented ``service.action``.

    Attributes:
        name: the ClearML name, ``service.action``.
        handler: ``handler(api, body) -> data``.
        body: how the request body is read: ``json`` (one object), ``lines`` (JSON lines, a
            list) or ``none`` (ignored).
        login: whether the access key and secret (HTTP Basic) are accepted as well as a token.
    """

    name: str
    handler: Handler
    body: BodyKind = "json"
    login: bool = False


ENDPOINTS: dict[str, Endpoint] = {}


def endpoint(name: str, *, body: BodyKind = "json", login: bool = False) -> Callable[[Handler], Handler]:
    """Register a handler for ``service.action`` (the one way an endpoint is added).

    Args:
        name: the ClearML endpoint name, e.g. ``tasks.create``.
        body: how the request body is read (see :class:`Endpoint`).
        login: accept the key and secret instead of a token (``auth.login`` only).

    Raises:
        ValueError: ``name`` is not ``service.action`` or is registered already.
    """
    if not re.fullmatch(r"[a-z_]+\.[a-z_]+", name):
        raise ValueError(f"endpoint name must be service.action: {name!r}")

    def register(fn: Handler) -> Handler:
        if name in ENDPOINTS:
            raise ValueError(f"endpoint {name} is registered twice")
        ENDPOINTS[name] = Endpoint(name, fn, body, login)
        return fn

    return register


def now() -> str:
    """ISO-8601 UTC timestamp, the format ClearML uses."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_id() -> str:
    """A ClearML-style 32-hex-digit id."""
    return uuid.uuid4().hex


class Api:
    """Dispatches ``service.action`` calls to the registered endpoints.

    Built by :func:`stepwise.clearml_server.services.create_api`, which registers every service
    first. Agents (workers) live in memory, as the real server keeps them in Redis.

    Args:
        store: the documents and events.
        issue_token: makes a new session token (``auth.login``).
    """

    def __init__(self, store: Store, issue_token: Callable[[], str]) -> None:
        self.store = store
        self.issue_token = issue_token
        self.workers: dict[str, dict[str, Any]] = {}  # agents, by worker id (in memory, like Redis)
        self.workers_lock = threading.RLock()  # held by every read and change of ``workers``

    def handle(self, name: str, raw: bytes) -> dict[str, Any]:
        """Read a request body as the endpoint declares it, then :meth:`call` the endpoint.

        Raises:
            ApiError: invalid JSON, a bad request or an unknown endpoint.
        """
        found = ENDPOINTS.get(name)
        kind = found.body if found is not None else "json"
        body: Any = {}
        try:
            if kind == "lines":
                body = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
            elif kind == "json" and raw.strip():
                body = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, 0, f"Invalid JSON body: {exc}") from None
        return self.call(name, body)

    def call(self, name: str, body: Any) -> dict[str, Any]:
        """Run one endpoint; raises ApiError for bad requests and unknown endpoints."""
        found = ENDPOINTS.get(name)
        if found is None:
            raise ApiError(400, 0, f"Invalid request path /{name}")
        if found.body == "json":
            if not isinstance(body, dict):
                raise ApiError(400, 0, "Request body must be a JSON object")
            check_field_types(name, body)
        return found.handler(self, body)

    # -- helpers shared by the handlers -------------------------------------------------------
    def require(self, kind: str, body: dict[str, Any], field: str) -> Document:
        """The document whose id is ``body[field]``; a ClearML validation or invalid-id error if none."""
        doc_id = body.get(field)
        if not isinstance(doc_id, str) or not doc_id:
            raise ApiError(400, 12, f"Validation error: missing required field '{field}'")
        doc = self.store.get(kind, doc_id)
        if doc is None:
            raise ApiError(400, INVALID_ID_SUBCODE.get(kind, 10), f"Invalid {kind} id: {field}={doc_id}")
        return doc


    def edit(self, kind: str, doc_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Set top-level (or dotted) fields on a document; answer ``{updated, fields}``."""
        fields = {k: v for k, v in fields.items() if v is not None}

        def change(doc: Document) -> None:
            for key, value in fields.items():
                set_path(doc, key, value)
            doc["last_update"] = now()
            if kind == "task":
                doc["last_change"] = doc["last_update"]

        updated = self.store.update(kind, doc_id, change)
        return {"updated": int(updated is not None), "fields": fields}


# -- request validation ------------------------------------------------------------------------
def validation_error(field: str, expected: str) -> ApiError:
    """ClearML's 400 validation error naming ``field``."""
    return ApiError(400, 12, f"Validation error: '{field}' must be {expected}")


def is_integer(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float that is neither a bool, NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_field_types(name: str, body: dict[str, Any]) -> None:
    """Refuse a request whose id, name or integer fields have the wrong type.

    Raises:
        ApiError: 400 (ClearML's validation error) naming the field.
    """
    lookup = name.split(".", 1)[1].startswith("get")
    for field in STRING_FIELDS:
        value = body.get(field)
        if value is None or isinstance(value, str):
            continue
        if lookup and isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue
        raise validation_error(field, "a string or a list of strings" if lookup else "a string")
    ids = body.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(v, str) for v in ids)):
        raise validation_error("ids", "a list of strings")
    for field in INTEGER_FIELDS:
        value = body.get(field)
        if value is not None and not is_integer(value):
            raise validation_error(field, "an integer")


# -- documents ---------------------------------------------------------------------------------
def set_path(doc: Document, path: str, value: Any) -> None:
    """Set a dotted field (``execution.queue``), creating the parents on the way."""
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def get_path(doc: Document, path: str) -> Any:
    """A dotted field's value, or None where any part of the path is missing."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def create_unique(api: Api, kind: str, doc: Document, *, subcode: int) -> str:
    """Store ``doc`` unless a document of that kind already has its name (ClearML refuses those)."""
    with api.store.transaction():
        if any(other["name"] == doc["name"] for other in api.store.all(kind)):
            raise ApiError(400, subcode, f"{kind.title()} with the same name already exists: name={doc['name']}")
        api.store.put(kind, doc)
    return doc["id"]


# -- queries -----------------------------------------------------------------------------------
def as_list(value: Any) -> list[Any] | None:
    """A request field that may be one value or a list, as a list (None stays None)."""
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def match_tags(have: list[str], wanted: list[str] | None) -> bool:
    """ClearML tag filter: plain tags are OR-ed (``__$and``/``__$all`` switch to AND),
    ``-tag`` excludes, ``__$not`` negates the next tag."""
    if not wanted:
        return True
    have_set = set(have or [])
    include: list[str] = []
    exclude: list[str] = []
    mode_all = False
    negate = False
    for tag in wanted:
        if tag in ("__$and", "__$all"):
            mode_all = True
        elif tag in ("__$or", "__$any"):
            mode_all = False
        elif tag == "__$not":
            negate = True
        elif tag.startswith("-") or negate:
            exclude.append(tag[1:] if tag.startswith("-") else tag)
            negate = False
        else:
            include.append(tag)
    if exclude and have_set & set(exclude):
        return False
    if not include:
        return True
    return all(t in have_set for t in include) if mode_all else any(t in have_set for t in include)


def query(api: Api, kind: str, body: dict[str, Any], equal_fields: tuple[str, ...] = ()) -> list[Document]:
    """Filter, order, page and project documents the way ``*.get_all`` does."""
    docs = api.store.all(kind)
    ids = as_list(body.get("id"))
    if ids is not None:
        docs = [d for d in docs if d["id"] in ids]
    elif kind in HIDEABLE and not body.get("search_hidden"):
        # as the real server: hidden entities (dataset and pipeline projects, their tasks) are
        # left out unless asked for by id or with search_hidden
        docs = [d for d in docs if HIDDEN not in (d.get("system_tags") or [])]
    name = body.get("name")
    if isinstance(name, str) and name:
        pattern = name_pattern(name)
        docs = [d for d in docs if pattern.search(d.get("name") or "")]
    for field in ("project", "parent", *equal_fields):
        values = as_list(body.get(field))
        if values is not None:
            docs = [d for d in docs if d.get(field) in values]
    if isinstance(body.get("ready"), bool):
        docs = [d for d in docs if d.get("ready") is body["ready"]]
    for field in ("tags", "system_tags"):
        wanted = as_list(body.get(field))
        if wanted:
            docs = [d for d in docs if match_tags(d.get(field, []), wanted)]
    for key in (body.get("order_by") and as_list(body["order_by"]) or [])[::-1]:
        reverse = key.startswith("-")
        field = key.lstrip("-+")
        docs.sort(key=lambda d, f=field: (get_path(d, f) is not None, get_path(d, f) or ""), reverse=reverse)
    page, size = body.get("page"), body.get("page_size")
    if isinstance(page, int) and isinstance(size, int) and size > 0:
        docs = docs[page * size : (page + 1) * size]
    elif isinstance(size, int) and size > 0:
        docs = docs[:size]
    only = as_list(body.get("only_fields"))
    if only:
        docs = [_project_fields(d, ["id", *only]) for d in docs]
    return docs


MAX_PATTERN = 256  # characters of a ``name`` pattern


def name_pattern(name: str) -> re.Pattern[str]:
    """Compile a ``get_all`` ``name`` filter: a regular expression, as ClearML's, with its cost bounded.

    At most :data:`MAX_PATTERN` characters, no back-references, and no unbounded repetition of
    something that itself repeats or branches (``(a+)+``, ``(a|ab)*``): the patterns whose
    matching time grows exponentially with the name. Plain names and the SDK's ``^name$`` (with
    ``re.escape``) are unaffected.

    Raises:
        ApiError: 400 for an invalid, too long or too costly pattern.
    """
    def refuse(why: str) -> ApiError:
        return ApiError(400, 12, f"Validation error: 'name' {why}")

    if len(name) > MAX_PATTERN:
        raise refuse(f"is longer than {MAX_PATTERN} characters")
    try:
        pattern = re.compile(name)
        parsed = _sre_parser.parse(name)
    except (re.error, RecursionError):
        raise refuse("is not a valid regular expression") from None
    if _costly(parsed, inside_repeat=False):
        raise refuse("has a back-reference, or repeats a repetition or an alternation (an exponential cost)")
    return pattern


def _costly(items: Any, inside_repeat: bool) -> bool:
    """Whether a parsed pattern has a back-reference, or repeats (without bound) a repeat or a branch."""
    for op, arg in items:
        name = str(op)
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            return True
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = arg
            if inside_repeat:
                return True
            if _costly(sub, inside_repeat=high == _sre_parser.MAXREPEAT or high > 16):
                return True
        elif name == "BRANCH":
            if inside_repeat:
                return True
            if any(_costly(alternative, inside_repeat) for alternative in arg[1]):
                return True
        elif name in ("SUBPATTERN", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT"):
            sub = arg[-1]
            if _costly(sub, inside_repeat):
                return True
    return False


def _project_fields(doc: Document, fields: list[str]) -> Document:
    """Keep only ``fields`` (dotted paths). As MongoDB projections do, an existing parent of a
    missing leaf comes back empty: ``runtime.version`` of a task without one gives ``runtime: {}``."""
    out: Document = {}
    for field in fields:
        value = get_path(doc, field)
        if value is not None or field in doc:
            set_path(out, field, copy.deepcopy(value))
            continue
        parts = field.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:depth])
            if isinstance(get_path(doc, parent), dict):
                if get_path(out, parent) is None:
                    set_path(out, parent, {})
                break
    return out


# -- generated endpoints -----------------------------------------------------------------------
def register_lookups(kind: str, equal_fields: tuple[str, ...] = ()) -> None:
    """Register ``<kind>s.get_all``, ``<kind>s.get_all_ex`` and ``<kind>s.get_by_id``.

    ``get_all`` answers ``{"<kind>s": [...]}`` filtered by :func:`query`; ``get_by_id`` takes
    ``{"<kind>": id}`` and answers ``{"<kind>": {...}}``.
    """
    plural = f"{kind}s"

    def get_all(api: Api, body: dict[str, Any]) -> dict[str, Any]:
        return {plural: query(api, kind, body, equal_fields)}

    def get_by_id(api: Api, body: dict[str, Any]) -> dict[str, Any]:
        return {kind: api.require(kind, body, kind)}

    endpoint(f"{plural}.get_all")(get_all)
    endpoint(f"{plural}.get_all_ex")(get_all)
    endpoint(f"{plural}.get_by_id")(get_by_id)


def register_batch(name: str, single: Handler, field: str,
                   shape: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> None:
    """Register ``name`` (a ``*_many`` endpoint): ``single`` for each of ``ids``, answered as
    ClearML's batch result (``succeeded`` with each answer, ``failed`` with each error)."""

    def run(api: Api, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids:
            raise ApiError(400, 17, "Batch request contains no items: ids")
        rest = {k: v for k, v in body.items() if k != "ids"}
        succeeded, failed = [], []
        for doc_id in ids:
            try:
                succeeded.append({"id": doc_id, **shape(single(api, {**rest, field: doc_id}))})
            except ApiError as exc:
                failed.append({"id": doc_id, "error": {"codes": [exc.code, exc.subcode], "msg": exc.message,
                                                       "data": {field: doc_id}}})
        return {"succeeded": succeeded, "failed": failed}

    endpoint(name)(run)


def set_archived(api: Api, kind: str, ids: list[str], archive: bool) -> dict[str, Any]:
    """Add (or remove) the ``archived`` system tag on each of ``ids``; a batch result."""
    succeeded, failed = [], []
    for doc_id in ids or []:
        if api.store.get(kind, doc_id) is None:
            failed.append({"id": doc_id, "error": {"codes": [400, 201 if kind == "model" else 101],
                                                   "msg": f"Invalid {kind} id", "data": {"id": doc_id}}})
            continue

        def change(doc: Document) -> None:
            tags = [t for t in doc.get("system_tags") or [] if t != ARCHIVED]
            doc["system_tags"] = [*tags, ARCHIVED] if archive else tags
            doc["last_update"] = now()

        api.store.update(kind, doc_id, change)
        succeeded.append({"id": doc_id, ("archived" if archive else "unarchived"): True})
    return {"succeeded": succeeded, "failed": failed}

