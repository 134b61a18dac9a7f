"""HTTP front of the local ClearML server: auth, the API envelope, and the file server.

Routes, all on one port:

* ``/auth.login`` and ``/v2.x/<service>.<action>`` (any method): the REST API, one module per
  service in ``services/`` (``stepwise clearml-server --list-endpoints`` lists them).
  ``auth.login`` takes HTTP Basic key:secret and returns a JWT the SDK decodes (unverified) for
  ``api_version``; every other call needs ``Authorization: Bearer <token>``.
* ``/files/...``: the file server (see ``fileserver.py``). ``POST /files/`` takes a multipart
  form whose field name is the target path; ``GET /files/<path>`` returns it. Paths stay inside
  the data directory.
* ``/``, ``/projects/...``, ``/compare``: the read-only results pages (see ``web.py``), the
  link the SDK prints on ``Task.init`` included. Open on 127.0.0.1; bound to any other address
  they ask for the key and secret (HTTP Basic). ``/view-files/...`` needs them everywhere (or
  the signed link a page shows).

Security (``docs/security.md``): credentials are checked before a body is read; a network bind
refuses the documented secret (:func:`server_credentials`); tokens are signed with a key derived
from the secret; a ``Host`` that is not loopback, an IP address, the bound name or an
``--allow-host`` name is answered 421; connections wait in a waiting room (no thread) until their
request head arrives, and at most :data:`MAX_ACTIVE` requests run at once; uploads and downloads
stream through a few 64 KiB chunks; one server per data folder (``server.lock``).

One request per connection: every answer says ``Connection: close`` and the server closes the
socket, as ClearML's own servers do (werkzeug's server behind ``apiserver``/``fileserver`` has
closed every connection since 2.1.2; gunicorn's sync workers too). The SDK relies on it: it forks
its background reporter after ``Task.init`` has used its HTTP session, so a keep-alive connection
left in that session's pool would be one socket shared by two processes, each able to read the
other's answer and then wait (300 s) for its own.

Set ``CLEARML_API_HOST=http://HOST:PORT``, ``CLEARML_WEB_HOST=http://HOST:PORT`` and
``CLEARML_FILES_HOST=http://HOST:PORT/files`` (``stepwise clearml-server`` prints them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import selectors
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import jwt

from stepwise.clearml_server import fileserver, web
from stepwise.clearml_server.api import API_VERSION, ENDPOINTS, SERVER_VERSION, ApiError
from stepwise.clearml_server.fileserver import UnsafePath
from stepwise.clearml_server.services import create_api
from stepwise.clearml_server.store import Store

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "stepwise-local-key"
DEFAULT_SECRET_KEY = "stepwise-local-secret"
CREDENTIALS_FILE = "credentials.json"  # generated in the data folder for a network bind (mode 0600)
TOKEN_LIFETIME_S = 24 * 3600
MAX_JSON_BYTES = 64 * 1024**2  # an API body (events.add_batch batches included)
MAX_UPLOAD_BYTES = 64 * 1024**3  # a /files upload (streamed to disk)
MAX_DRAIN_BYTES = 1024**2  # an unread body up to this is read and dropped; a longer one closes the connection
SOCKET_TIMEOUT_S = 20  # a client silent this long mid-request is dropped
IDLE_TIMEOUT_S = 10  # a connection whose request head has not arrived this long after connecting is closed
MAX_WAITING = 1024  # connections accepted and waiting for their first bytes
MAX_ACTIVE = 64  # requests handled at once (a thread each); over it, 503
MAX_HEAD_BYTES = 64 * 1024  # a request head (request line and headers) longer than this is not waited for
# a /files download is data for the SDK: never sniffed or run as a page, whoever opens it
FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}
API_PATH = re.compile(r"^/(?:v(?P<version>\d+\.\d+)/)?(?P<name>[a-z_]+\.[a-z_]+)$")


class InsecureBind(ValueError):
    """A network bind with the documented default key pair: refused before anything listens."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it readable by its owner only (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` into a new file readable by its owner only (0600)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    path.chmod(0o600)


class DataInUse(RuntimeError):
    """Another server holds the data folder's lock."""


def lock_data_dir(data_dir: Path) -> int:
    """Take ``DATA/server.lock`` for this process (one server per data folder); returns its descriptor.

    Raises:
        DataInUse: another server holds it.
    """
    fd = os.open(data_dir / "server.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no lock
        return fd
    except OSError:
        os.close(fd)
        raise DataInUse(f"another stepwise clearml-server is running on {data_dir}") from None
    return fd


def host_name(header: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8008`` -> ``::1``), lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_ip_literal(name: str) -> bool:
    """Whether ``name`` is an IP address (which DNS rebinding cannot use)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass
class _Waiting:
    """A connection in the waiting room: who, since when, and its request head so far."""

    address: Any
    since: float
    head: bytearray


class _PrefixedSocket(io.RawIOBase):
    """A socket read as a stream, after the bytes already read from it."""

    def __init__(self, prefix: bytes, sock: socket.socket) -> None:
        self._prefix, self._sock = prefix, sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            count = min(len(buffer), len(self._prefix))
            buffer[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        return self._sock.recv_into(buffer)


class ClearMLServer(ThreadingHTTPServer):
    """The server object: holds the store, the credentials and the token key."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, data_dir: Path, access_key: str, secret_key: str,
                 trace: Path | None = None, allowed_hosts: tuple[str, ...] = ()) -> None:
        self.trace = trace
        self.trace_lock = threading.Lock()
        self.data_dir = private_dir(data_dir).resolve()
        self._lock_fd = lock_data_dir(self.data_dir)
        if trace is not None:  # it holds what the API answers: readable by its owner only
            trace.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(trace, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
        # names a Host header may carry (IP literals always may): loopback, the bound name, the
        # configured ones, and on a network bind this machine's names
        self.allowed_hosts = {"localhost", host.lower(), *(h.lower() for h in allowed_hosts)}
        if not is_loopback(host):
            self.allowed_hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.files_dir = private_dir(self.data_dir / "files")
        self.store = Store(self.data_dir / "clearml.sqlite")
        self.api = create_api(self.store, self.issue_token)
        self.access_key, self.secret_key = access_key, secret_key
        self._login = threading.local()  # the expiry a token minted from a token may not pass
        key_file = self.data_dir / "token.key"
        if not key_file.exists():
            write_private(key_file, secrets.token_hex(32))
        # tokens are signed with a key derived from the secret: a new key pair invalidates them
        self.token_key = hmac.new(key_file.read_text().strip().encode(),
                                  f"{access_key}:{secret_key}".encode(), hashlib.sha256).hexdigest()
        self.incoming_dir = private_dir(self.data_dir / "incoming")  # uploads being received
        for stale in self.incoming_dir.glob("*.part"):  # left by a server killed mid-upload
            stale.unlink()
        self._active = threading.BoundedSemaphore(MAX_ACTIVE)
        self._selector = selectors.DefaultSelector()
        self._waiting_lock = threading.Lock()
        self._closing = False
        self._heads: dict[Any, bytes] = {}  # what the waiting room read of each handed-off connection
        super().__init__((host, port), RequestHandler)
        threading.Thread(target=self._waiting_room, name="clearml-server waiting room", daemon=True).start()

    # -- connections: a waiting room, then a bounded number of handler threads --------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        """Park a new connection in the waiting room until its request head has arrived: an idle or
        slow client holds no thread, and is closed :data:`IDLE_TIMEOUT_S` after connecting."""
        with self._waiting_lock:
            if self._closing or len(self._selector.get_map()) >= MAX_WAITING:
                self.shutdown_request(request)
                return
            request.setblocking(False)
            self._selector.register(request, selectors.EVENT_READ,
                                    _Waiting(client_address, time.monotonic(), bytearray()))

    def _waiting_room(self) -> None:
        """Read request heads; hand a complete one to a handler thread; close clients too slow."""
        while not self._closing:
            try:
                ready = self._selector.select(timeout=0.2)
            except (OSError, ValueError):  # the selector was closed
                return
            for key, _ in ready:
                sock, waiting = key.fileobj, key.data
                try:
                    data = sock.recv(MAX_HEAD_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                waiting.head += data
                if data and b"\r\n\r\n" not in waiting.head and len(waiting.head) < MAX_HEAD_BYTES:
                    continue  # more of the head to come
                with self._waiting_lock:
                    self._selector.unregister(sock)
                if not data:  # closed by the client
                    self.shutdown_request(sock)
                    continue
                sock.setblocking(True)
                self._start_handler(sock, waiting.address, bytes(waiting.head))
            deadline = time.monotonic() - IDLE_TIMEOUT_S
            with self._waiting_lock:
                idle = [key for key in self._selector.get_map().values() if key.data.since < deadline]
                for key in idle:
                    self._selector.unregister(key.fileobj)
            for key in idle:
                self.shutdown_request(key.fileobj)

    def _start_handler(self, request: Any, client_address: Any, head: bytes) -> None:
        if not self._active.acquire(blocking=False):  # every handler busy: answer at once, hold nothing
            try:
                request.settimeout(1)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                                b"Retry-After: 1\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return

        def run() -> None:
            try:
                self._heads[request] = head
                self.process_request_thread(request, client_address)
            finally:
                self._active.release()

        threading.Thread(target=run, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def environment(self) -> dict[str, str]:
        """The SDK variables that point at this server."""
        return sdk_environment(self.url, self.access_key, self.secret_key)

    def issue_token(self) -> str:
        """A session token (``auth.login``), valid :data:`TOKEN_LIFETIME_S`; one minted from a token
        (``auth.login`` with ``Bearer``) expires when that token does, so tokens cannot renew themselves."""
        now = int(time.time())
        expires = now + TOKEN_LIFETIME_S
        limit = getattr(self._login, "expires", None)
        if limit is not None:
            expires = min(expires, limit)
        claims = {"api_version": API_VERSION, "server_version": SERVER_VERSION, "feature_set": "basic",
                  "env": "local", "iat": now, "exp": expires,
                  "identity": {"user": "stepwise-local-user", "company": "stepwise-local", "role": "admin"}}
        return jwt.encode(claims, self.token_key, algorithm="HS256")

    def check_basic(self, header: str) -> bool:
        """Whether an ``Authorization: Basic`` header carries the key and secret."""
        try:
            decoded = base64.b64decode(header.split(" ", 1)[1], validate=True)
        except (ValueError, IndexError):  # any malformed header is simply not authorised
            return False
        key, _, secret = decoded.partition(b":")
        return hmac.compare_digest(key, self.access_key.encode()) & hmac.compare_digest(
            secret, self.secret_key.encode())

    def bearer_claims(self, header: str) -> dict[str, Any] | None:
        """The claims of a valid ``Authorization: Bearer`` token, or None."""
        try:
            return jwt.decode(header.split(" ", 1)[1], self.token_key, algorithms=["HS256"],
                              options={"require": ["exp"]})
        except (jwt.PyJWTError, IndexError):
            return None

    def check_bearer(self, header: str) -> bool:
        """Whether an ``Authorization: Bearer`` header carries a valid token."""
        return self.bearer_claims(header) is not None

    def sign_file(self, path: str) -> str:
        """The query that opens ``/view-files<path>`` without credentials for a day (the pages' links)."""
        expires = (int(time.time()) // 3600 + 25) * 3600  # the same link for an hour: images stay cached
        return urlencode({"exp": expires, "sig": self._file_signature(path, expires)})

    def file_signature_valid(self, path: str, query: str) -> bool:
        """Whether ``query`` carries an unexpired signature of ``path`` (see :meth:`sign_file`)."""
        params = parse_qs(query)
        try:
            expires = int(params["exp"][-1])
            signature = params["sig"][-1]
        except (KeyError, ValueError, IndexError):
            return False
        return expires > time.time() and hmac.compare_digest(signature, self._file_signature(path, expires))

    def _file_signature(self, path: str, expires: int) -> str:
        return hmac.new(self.token_key.encode(), f"view-files\n{path}\n{expires}".encode(),
                        hashlib.sha256).hexdigest()

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's ``Host`` names this server (against DNS rebinding)."""
        if header is None:
            return True
        name = host_name(header)
        return is_ip_literal(name) or name in self.allowed_hosts

    def server_close(self) -> None:
        self._closing = True
        with self._waiting_lock:
            waiting = [key.fileobj for key in self._selector.get_map().values()]
            for sock in waiting:
                self._selector.unregister(sock)
        for sock in waiting:
            self.shutdown_request(sock)
        self._selector.close()
        super().server_close()
        self.store.close()
        os.close(self._lock_fd)


class RequestHandler(BaseHTTPRequestHandler):
    """One HTTP request: API call, file transfer or the HTML page."""

    server: ClearMLServer
    _unread: int = 0  # bytes of the request body not read yet
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "stepwise-clearml/" + SERVER_VERSION
    timeout = SOCKET_TIMEOUT_S  # a client silent this long mid-request is dropped

    def setup(self) -> None:
        """The socket as a stream that starts with what the waiting room read of it."""
        super().setup()
        head = self.server._heads.pop(self.request, b"")
        self.rfile = io.BufferedReader(_PrefixedSocket(head, self.connection), fileserver.CHUNK)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- dispatch ---------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        path = unquote(urlsplit(self.path).path)
        self._unread = 0
        try:
            if not self.server.host_allowed(self.headers.get("Host")):
                self._api_error(path.lstrip("/"), None, ApiError(421, 0, "Misdirected request: unknown Host"))
                return
            self._unread = self._content_length()
            if path == "/files" or path.startswith("/files/"):
                self._files(path[len("/files"):])
            elif match := API_PATH.match(path):
                self._api(match.group("name"), match.group("version"))
            elif self.command == "GET" and web.is_web_path(path):
                self._web(path, urlsplit(self.path).query)
            else:
                self._api_error(f"{path.lstrip('/')}", None, ApiError(400, 0, "Invalid request path"))
        except (ConnectionError, TimeoutError):
            self._unread = 0
            self.close_connection = True
        except ApiError as exc:  # raised before the handler's own error handling (a body too large)
            self._api_error(path.lstrip("/"), None, exc)
        except Exception:  # noqa: BLE001 - a server bug must not kill the server
            log.exception("internal error on %s %s", self.command, path)
            self._api_error(path.lstrip("/"), None, ApiError(500, 0, "Internal server error"))
        finally:
            self._drain()

    def _content_length(self) -> int:
        """The body's length; a missing header is 0.

        Raises:
            ApiError: 400 for a negative or malformed ``Content-Length``, 411 for a chunked body.
        """
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise ApiError(411, 0, "Content-Length required (chunked bodies are not accepted)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        if len(set(values)) != 1 or not values[0].strip().isdigit():
            raise ApiError(400, 0, "Invalid Content-Length")
        return int(values[0])

    def _body(self, limit: int = MAX_JSON_BYTES) -> bytes:
        """The whole body (API calls and forms only: uploads stream)."""
        length, self._unread = self._unread, 0
        if length > limit:
            self._unread = length  # not read: the connection is closed instead (see _drain)
            raise ApiError(413, 0, "Request body too large")
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            raise ConnectionError("the client closed the connection mid-body")
        return data

    def _drain(self) -> None:
        """Read what is left of a small body the answer did not need, so closing does not reset the
        socket; a large one is not read (the connection closes)."""
        left, self._unread = self._unread, 0
        if left > MAX_DRAIN_BYTES:
            self.close_connection = True
            return
        try:
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
        except (ConnectionError, TimeoutError, OSError):
            pass

    def _start_answer(self, status: int) -> None:
        """Status line and ``Connection: close``: one request per connection (see the module docstring)."""
        self.send_response(status)
        self.send_header("Connection", "close")

    # -- API --------------------------------------------------------------------------------
    def _api(self, name: str, version: str | None) -> None:
        auth = self.headers.get("Authorization") or ""
        known = ENDPOINTS.get(name)
        self.server._login.expires = None
        # credentials are checked before the body is read
        if known is not None and known.login:
            claims = self.server.bearer_claims(auth) if auth.startswith("Bearer ") else None
            if claims is not None:  # a token renewed from a token keeps its expiry
                self.server._login.expires = claims["exp"]
            elif not (auth.startswith("Basic ") and self.server.check_basic(auth)):
                self._api_error(name, version, ApiError(401, 20, "Unauthorized (invalid credentials)"))
                return
        elif not (auth.startswith("Bearer ") and self.server.check_bearer(auth)):
            self._api_error(name, version, ApiError(401, 21, "Unauthorized (missing or invalid token)"))
            return
        try:
            data = self.server.api.handle(name, self._body())
        except ApiError as exc:
            self._api_error(name, version, exc)
            return
        finally:
            self.server._login.expires = None
        self._api_ok(name, version, data)

    def _meta(self, name: str, version: str | None, code: int, subcode: int, message: str) -> dict[str, Any]:
        trx = uuid.uuid4().hex
        return {"id": trx, "trx": trx, "endpoint": {"name": name, "requested_version": version or API_VERSION,
                                                   "actual_version": API_VERSION},
                "result_code": code, "result_subcode": subcode, "result_msg": message, "error_stack": None,
                "error_data": {}}

    def _api_ok(self, name: str, version: str | None, data: dict[str, Any]) -> None:
        self._answer(name, 200, {"meta": self._meta(name, version, 200, 0, "OK"), "data": data})

    def _api_error(self, name: str, version: str | None, error: ApiError) -> None:
        self._answer(name, error.code, {"meta": self._meta(name, version, error.code, error.subcode,
                                                            error.message), "data": {}})

    def _answer(self, name: str, status: int, payload: dict[str, Any]) -> None:
        if self.server.trace is not None:
            with self.server.trace_lock, open(self.server.trace, "a", encoding="utf-8") as out:
                data = payload.get("data")
                recorded = {**payload, "data": {**data, "token": "[hidden]"}} \
                    if isinstance(data, dict) and "token" in data else payload
                out.write(json.dumps({"endpoint": name, "status": status, "response": recorded}) + "\n")
        self._send_json(status, payload)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self._start_answer(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_file(self, stream: BinaryIO, size: int, content_type: str, headers: dict[str, str]) -> None:
        """A file from disk, a chunk at a time."""
        with stream:
            self._start_answer(200)
            for key, value in {"Content-Type": content_type, "Content-Length": str(size), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            while chunk := stream.read(fileserver.CHUNK):
                self.wfile.write(chunk)

    # -- files ------------------------------------------------------------------------------
    def _authorised_for_files(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        return (auth.startswith("Bearer ") and self.server.check_bearer(auth)) or (
            auth.startswith("Basic ") and self.server.check_basic(auth))

    def _cross_site(self) -> bool:
        """Whether the browser says this request comes from another site (``Sec-Fetch-Site``, ``Origin``)."""
        fetch_site = (self.headers.get("Sec-Fetch-Site") or "").lower()
        if fetch_site and fetch_site not in ("same-origin", "none"):
            return True
        origin = self.headers.get("Origin")
        if origin is None:
            return False
        parts = urlsplit(origin)
        return parts.netloc.lower() != (self.headers.get("Host") or "").lower() or parts.scheme != "http"

    def _files(self, path: str) -> None:
        if not self._authorised_for_files():
            self._api_error("files", None, ApiError(401, 21, "Unauthorized (missing or invalid token)"))
            return
        if self.command in ("POST", "PUT", "DELETE") and self._cross_site():
            self._api_error("files", None, ApiError(403, 0, "Cross-site requests may not change files"))
            return
        try:
            if self.command == "POST":
                self._upload()
            elif self.command == "GET":
                found = fileserver.open_file(self.server.files_dir, path)
                if found is None:
                    self._api_error("files", None, ApiError(404, 0, "File not found"))
                    return
                self._send_file(*found, "application/octet-stream", FILE_HEADERS)
            elif self.command == "DELETE":
                existed = fileserver.delete(self.server.files_dir, path)
                self._send_json(200 if existed else 404, {"deleted": existed})
            else:
                self._api_error("files", None, ApiError(405, 0, f"Method {self.command} not allowed"))
        except UnsafePath as exc:
            self._api_error("files", None, ApiError(400, 0, str(exc)))

    def _upload(self) -> None:
        length, self._unread = self._unread, 0
        if length > MAX_UPLOAD_BYTES:
            self._unread = length
            raise ApiError(413, 0, f"Upload too large (at most {MAX_UPLOAD_BYTES} bytes)")
        consumed = 0

        def read(count: int) -> bytes:
            nonlocal consumed
            chunk = self.rfile.read(count)
            consumed += len(chunk)
            return chunk

        try:
            saved = fileserver.store_upload(self.server.files_dir, self.server.incoming_dir,
                                            self.headers.get("Content-Type") or "", read, length)
        finally:
            self._unread = length - consumed
        self._send_json(200, saved)

    # -- results pages (web.py) ----------------------------------------------------------------
    def _web(self, path: str, query: str) -> None:
        if path.startswith("/view-files/"):  # the file view: as /files, on loopback too, or a page's signed link
            private = not self.server.file_signature_valid(path[len("/view-files"):], query)
        else:
            private = web.needs_credentials(self.server.server_address[0])
        if private and not self._authorised_for_files():
            self._start_answer(401)
            self.send_header("WWW-Authenticate", 'Basic realm="stepwise ClearML server (access key and secret)"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        site = web.Site(self.server.store, self.server.files_dir, (self.server.access_key, self.server.secret_key),
                        sign=self.server.sign_file)
        page = web.render(site, path, query)
        headers = {"X-Content-Type-Options": "nosniff", **web.SECURITY_HEADERS, **page.headers}
        if page.file is not None:
            stream = page.file.open("rb")
            self._send_file(stream, os.fstat(stream.fileno()).st_size, page.content_type, headers)
            return
        self._start_answer(page.status)
        for name, value in {"Content-Type": page.content_type, "Content-Length": str(len(page.body)),
                            **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(page.body)


def local_credentials() -> tuple[str, str]:
    """The key and secret a server started here on loopback accepts (unless given others).

    ``STEPWISE_CLEARML_ACCESS_KEY``/``STEPWISE_CLEARML_SECRET_KEY`` when set, else the built-in
    local pair. Whoever starts ``stepwise clearml-server`` in a child process (``stepwise up``,
    the tests) points its SDK at it with the same pair through :func:`sdk_environment`.
    """
    return (os.environ.get("STEPWISE_CLEARML_ACCESS_KEY") or DEFAULT_ACCESS_KEY,
            os.environ.get("STEPWISE_CLEARML_SECRET_KEY") or DEFAULT_SECRET_KEY)


def server_credentials(host: str, data_dir: Path, access_key: str | None = None,
                       secret_key: str | None = None) -> tuple[str, str, str]:
    """The key pair a server on ``host`` accepts, and where its secret comes from.

    In order: the arguments (``--access-key``/``--secret-key``), the environment
    (``STEPWISE_CLEARML_ACCESS_KEY``/``STEPWISE_CLEARML_SECRET_KEY``), then on loopback the
    documented local pair, and on any other address a pair generated on first start into
    ``DATA/credentials.json`` (mode 0600) and read from there afterwards.

    Returns:
        ``(access_key, secret_key, origin)``, ``origin`` saying where the secret is (printed at
        start-up instead of the secret).

    Raises:
        InsecureBind: a non-loopback ``host`` with the documented default key or secret.
    """
    access_key = access_key or os.environ.get("STEPWISE_CLEARML_ACCESS_KEY")
    secret_key = secret_key or os.environ.get("STEPWISE_CLEARML_SECRET_KEY")
    origin = "the secret this server was started with"
    if not (access_key or secret_key) and not is_loopback(host):
        stored = private_dir(data_dir) / CREDENTIALS_FILE
        if not stored.exists():
            write_private(stored, json.dumps({"access_key": "stepwise-" + secrets.token_hex(8),
                                              "secret_key": secrets.token_urlsafe(32)}) + "\n")
            log.info("generated a key pair in %s", stored)
        pair = json.loads(stored.read_text(encoding="utf-8"))
        access_key, secret_key = pair["access_key"], pair["secret_key"]
        origin = f"in {stored}"
    access_key, secret_key = access_key or DEFAULT_ACCESS_KEY, secret_key or DEFAULT_SECRET_KEY
    if secret_key == DEFAULT_SECRET_KEY:
        origin = "the documented local default"
    if not is_loopback(host) and secret_key == DEFAULT_SECRET_KEY:
        raise InsecureBind(
            f"refusing to listen on {host} with the documented default key pair: set --access-key and "
            "--secret-key (or STEPWISE_CLEARML_ACCESS_KEY/STEPWISE_CLEARML_SECRET_KEY), or set neither to "
            f"have a pair generated into {Path(data_dir) / CREDENTIALS_FILE}")
    return access_key, secret_key, origin


def sdk_environment(url: str, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
    """The ``CLEARML_*`` variables that point the SDK at the server on ``url``.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8008``.
        access_key: default: :func:`local_credentials`.
        secret_key: default: :func:`local_credentials`.
    """
    default_key, default_secret = local_credentials()
    return {
        "CLEARML_API_HOST": url,
        "CLEARML_WEB_HOST": url,
        "CLEARML_FILES_HOST": f"{url}/files",
        "CLEARML_API_ACCESS_KEY": access_key or default_key,
        "CLEARML_API_SECRET_KEY": secret_key or default_secret,
    }


def serve(host: str = "127.0.0.1", port: int = 8008, data_dir: str | Path = ".stepwise/clearml",
          access_key: str | None = None, secret_key: str | None = None, trace: str | Path | None = None,
          ready: threading.Event | None = None, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Run the server until interrupted.

    ``trace`` names a JSON-lines file that receives every API answer (for schema checks and
    debugging; tokens are left out). Credentials: see :func:`server_credentials`. The server
    prints the environment to point the SDK at it, with the access key but never the secret.
    ``allowed_hosts`` are names (``Host`` header values) accepted besides loopback and the bound
    address.

    Raises:
        InsecureBind: a network bind with the documented default key pair.
        DataInUse: another server is running on ``data_dir``.
    """
    access_key, secret_key, origin = server_credentials(host, Path(data_dir), access_key, secret_key)
    server = ClearMLServer(host, port, Path(data_dir), access_key, secret_key,
                           trace=Path(trace) if trace else None, allowed_hosts=allowed_hosts)
    env = server.environment()
    print(f"stepwise ClearML server on {server.url} (data in {server.data_dir})", flush=True)
    print("point the clearml SDK at it with:", flush=True)
    for key, value in env.items():
        if key == "CLEARML_API_SECRET_KEY":
            print(f"  export {key}=...  # {origin}", flush=True)
        else:
            print(f"  export {key}={value}", flush=True)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
