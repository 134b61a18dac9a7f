"""The file server behind ``/files``: uploads, downloads and deletions inside one folder.

``POST /files/`` takes a multipart form whose field names are the target paths (as the SDK
uploads); ``GET /files/<path>`` returns a file, ``DELETE /files/<path>`` removes it. Every path
is checked by :func:`safe_file_path` (the results pages' ``/view-files/`` too): nothing leaves
the folder.

Uploads stream from the socket to disk (:func:`store_upload`): each file of the form goes to a
temporary file in the ``incoming`` folder beside the file store, is fsynced, and is renamed into
place only once the whole form has been read and every path checked; a failed upload leaves
nothing behind. Downloads stream from disk (:func:`open_file`). Memory stays a few chunks,
whatever the file size.
"""

from __future__ import annotations

import email.message
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 16
MAX_PART_HEADERS = 16 * 1024
MAX_PREAMBLE = 64 * 1024


class UnsafePath(ValueError):
    """An upload or download path that would leave the file store."""


def safe_file_path(root: Path, name: str) -> Path:
    """Map a file-server path (``/project/task.id/models/file``) to a file under ``root``.

    One leading slash is allowed (the SDK sends one); absolute paths beyond that, ``..``
    components, backslashes, NUL bytes and anything that resolves outside ``root`` are refused.

    Raises:
        UnsafePath: the path would leave ``root``.
    """
    if not name or "\x00" in name or "\\" in name:
        raise UnsafePath(f"invalid file path {name!r}")
    relative = name[1:] if name.startswith("/") else name
    parts = relative.split("/")
    if relative.startswith("/") or re.match(r"^[A-Za-z]:", relative) or any(p in ("..", ".", "") for p in parts):
        raise UnsafePath(f"invalid file path {name!r}")
    target = (root / relative).resolve()
    if target == root.resolve() or not target.is_relative_to(root.resolve()):
        raise UnsafePath(f"invalid file path {name!r}")
    return target


def open_file(root: Path, name: str) -> tuple[BinaryIO, int] | None:
    """A stored file opened for reading, with its size; None when there is none.

    Raises:
        UnsafePath: the path would leave ``root``.
    """
    target = safe_file_path(root, name)
    if not target.is_file():
        return None
    stream = target.open("rb")
    return stream, os.fstat(stream.fileno()).st_size


def delete(root: Path, name: str) -> bool:
    """Remove a stored file; True when it existed.

    Raises:
        UnsafePath: the path would leave ``root``.
    """
    target = safe_file_path(root, name)
    existed = target.is_file()
    if existed:
        target.unlink()
    return existed


class MalformedUpload(UnsafePath):
    """A body that is not a complete ``multipart/form-data`` form."""


class _Body:
    """The request body, ``length`` bytes of ``read``, read in chunks into a small buffer."""

    def __init__(self, read: Callable[[int], bytes], length: int) -> None:
        self._read, self.left, self.buffer = read, length, bytearray()

    def fill(self) -> bool:
        """Append one chunk to the buffer; False when the body is all read."""
        if self.left <= 0:
            return False
        chunk = self._read(min(CHUNK, self.left))
        if not chunk:
            raise ConnectionError("the client closed the connection during the upload")
        self.left -= len(chunk)
        self.buffer += chunk
        return True

    def until(self, marker: bytes, limit: int) -> bytes:
        """Everything up to ``marker`` (consumed, not returned), at most ``limit`` bytes."""
        while (index := self.buffer.find(marker)) < 0:
            if len(self.buffer) > limit or not self.fill():
                raise MalformedUpload("malformed multipart form")
        head = bytes(self.buffer[:index])
        del self.buffer[:index + len(marker)]
        return head

    def take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self.fill():
                raise MalformedUpload("malformed multipart form")
        head = bytes(self.buffer[:count])
        del self.buffer[:count]
        return head

    def copy_until(self, marker: bytes, out: BinaryIO | None) -> int:
        """Write everything up to ``marker`` into ``out`` (None: discard); returns how many bytes."""
        written = 0
        while (index := self.buffer.find(marker)) < 0:
            keep = len(marker) - 1  # a marker may straddle two chunks
            if len(self.buffer) > keep:
                if out is not None:
                    out.write(self.buffer[:-keep])
                written += len(self.buffer) - keep
                del self.buffer[:-keep]
            if not self.fill():
                raise MalformedUpload("malformed multipart form: the upload ended early")
        if out is not None:
            out.write(self.buffer[:index])
        del self.buffer[:index + len(marker)]
        return written + index


def _boundary(content_type: str) -> bytes:
    message = email.message.Message()
    message["Content-Type"] = content_type
    boundary = message.get_param("boundary")
    if message.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise UnsafePath("uploads must be multipart/form-data with a boundary")
    return boundary.encode("latin-1")


_NAME_PARAM = re.compile(r'(?:^|;)\s*name\s*=\s*(?:"([^"]*)"|([^;\s]+))', re.IGNORECASE)


def _field_name(headers: bytes) -> str | None:
    """A form part's field name, read as HTML5 multipart forms write it (browsers, urllib3 under
    the SDK): a quoted name runs to the next quote, backslashes included (a quote in a name is
    sent as ``%22``). A backslash is not an escape here, so ``a\\..\\b`` reaches the path check
    as written and is refused."""
    for line in headers.decode("utf-8", "surrogateescape").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            match = _NAME_PARAM.search(value)
            if match is None:
                return None
            return match.group(1) if match.group(1) is not None else match.group(2)
    return None


def store_upload(root: Path, incoming: Path, content_type: str, read: Callable[[int], bytes],
                 length: int) -> dict[str, int]:
    """Store the files of a ``multipart/form-data`` body under their field names, streaming.

    Each file goes to a temporary file in ``incoming`` (same file system as ``root``), is
    fsynced, and is renamed into place once the whole form has been read and every path
    checked. On any error every temporary file is removed and nothing is stored.

    Args:
        root: the file store.
        incoming: the folder for files being received.
        content_type: the request's ``Content-Type`` (with the boundary).
        read: reads up to ``n`` bytes of the body (the socket).
        length: the body's ``Content-Length``.

    Returns:
        The size of each stored file, by its path under ``root``.

    Raises:
        UnsafePath: not a multipart form, a malformed one, no file in it, or a path that would
            leave ``root``.
        ConnectionError: the client went away before the end of the body.
    """
    delimiter = b"--" + _boundary(content_type)
    body = _Body(read, length)
    received: list[tuple[Path, Path, int]] = []  # (temporary file, target, size)
    try:
        body.until(delimiter, MAX_PREAMBLE)
        while body.take(2) != b"--":
            name = _field_name(body.until(b"\r\n\r\n", MAX_PART_HEADERS))
            if not name:
                body.copy_until(b"\r\n" + delimiter, None)
                continue
            target = safe_file_path(root, name)
            temp = incoming / f"{uuid.uuid4().hex}.part"
            received.append((temp, target, 0))
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "wb") as out:
                size = body.copy_until(b"\r\n" + delimiter, out)
                out.flush()
                os.fsync(out.fileno())
            received[-1] = (temp, target, size)
        if not received:
            raise UnsafePath("no file in the upload")
        saved = {}
        for temp, target, size in received:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
            _fsync_dir(target.parent)
            saved[str(target.relative_to(root))] = size
        return saved
    finally:
        for temp, _, _ in received:
            temp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
