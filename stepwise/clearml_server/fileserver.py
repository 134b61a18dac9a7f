"""The file server behind ``/files``: uploads, downloads and deletions inside one folder.

``POST /files/`` takes a multipart form whose field names are the target paths (as the SDK
uploads); ``GET /files/<path>`` returns a file, ``DELETE /files/<path>`` removes it. Every path
is checked by :func:`safe_file_path` (the results pages' ``/view-files/`` too): nothing leaves
the folder. Writes go to a temporary name first, so a reader never sees half a file.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import re
import uuid
from pathlib import Path


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
    if relative.startswith("/") or re.match(r"^[A-Za-z]:", relative) or any(p in ("..", "") for p in parts):
        raise UnsafePath(f"invalid file path {name!r}")
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsafePath(f"invalid file path {name!r}")
    return target


def read(root: Path, name: str) -> bytes | None:
    """The bytes of a stored file, or None when there is none.

    Raises:
        UnsafePath: the path would leave ``root``.
    """
    target = safe_file_path(root, name)
    return target.read_bytes() if target.is_file() else None


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


def store_upload(root: Path, content_type: str, body: bytes) -> dict[str, int]:
    """Store the files of a ``multipart/form-data`` body under their field names.

    Every path is checked before anything is written.

    Returns:
        The size of each stored file, by its path under ``root``.

    Raises:
        UnsafePath: not a multipart form, no file in it, or a path that would leave ``root``.
    """
    if not content_type.startswith("multipart/form-data"):
        raise UnsafePath("uploads must be multipart/form-data")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode() + body)
    saved = {}
    targets = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        targets.append((safe_file_path(root, name), part.get_payload(decode=True) or b""))
    for target, payload in targets:  # every path is checked before anything is written
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        temp.write_bytes(payload)
        os.replace(temp, target)
        saved[str(target.relative_to(root))] = len(payload)
    if not saved:
        raise UnsafePath("no file in the upload")
    return saved
