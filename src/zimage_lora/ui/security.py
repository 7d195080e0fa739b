"""Who may talk to the UI server, and which files a request may touch.

- ``Guard`` (ASGI middleware) checks every HTTP request in this order: the ``Host`` header must be a name the server
  is bound as (400; a server bound to every interface takes any Host, its token protects it), an ``Origin`` header
  must name that same host (403: another site's page may not drive this one), and with a token the request must
  carry it as ``Authorization: Bearer`` or in the ``zl_token`` cookie (401 JSON for ``/api`` and ``/files``, a
  redirect to ``/login`` for pages). ``/login``, ``POST /api/login`` and ``/static/*`` are open.
- ``resolve_inside`` turns a URL path into a regular file inside a folder, refusing ``..``, absolute paths,
  percent-encoded leftovers and symlinks that lead out.
- ``check_name`` and ``upload_name`` keep job, dataset and file names to ``job.name``'s rule.
- ``read_upload`` enforces the upload types (Pillow must open an image) and the size limit.
"""

from __future__ import annotations

import hmac
import io
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from zimage_lora.data.dataset import IMAGE_EXTS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UPLOAD_EXTS = (*IMAGE_EXTS, ".txt")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
EVERY_INTERFACE = ("0.0.0.0", "::")
COOKIE = "zl_token"


class ApiError(Exception):
    """A request the server refuses: answered as ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None, **extra: object):
        super().__init__(message)
        self.status, self.message, self.field, self.extra = status, message, field, extra


def error_response(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


# --- names and paths ------------------------------------------------------------------------------------------------


def check_name(name: object, what: str, field: str | None = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApiError(
            400,
            f"{what} name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field,
        )
    return name


def upload_name(raw: str) -> str:
    """A safe name for an uploaded file: the name's rule, the extension kept (lower case); raises ApiError."""
    suffix = PurePosixPath(raw).suffix.lower() if raw else ""
    if suffix not in UPLOAD_EXTS:
        raise ApiError(415, f"{raw!r}: only {', '.join(UPLOAD_EXTS)} files can be uploaded", "files")
    if any(c in raw for c in "/\\\0"):
        raise ApiError(400, f"{raw!r}: a file name must not contain a folder; upload the file itself", "files")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", raw[: -len(suffix)]).lstrip("._-")[: 64 - len(suffix)]
    if not stem:
        raise ApiError(400, f"{raw!r}: the name has no letters or digits; rename the file", "files")
    return stem + suffix


def resolve_inside(root: Path, relative: str) -> Path | None:
    """The regular file at ``relative`` (a URL path, already percent-decoded once) inside ``root``, or None.

    A path that could leave ``root`` is refused before the disk is asked: ``..`` and ``.`` parts, absolute paths,
    backslashes, NUL, and any ``%`` (a second layer of percent-encoding). Symlinks are followed and must end inside.
    """
    if not relative or any(c in relative for c in "%\\\0") or relative.startswith("/"):
        return None
    if any(part in ("", ".", "..") for part in relative.split("/")):
        return None
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


# --- uploads --------------------------------------------------------------------------------------------------------


async def read_upload(upload: UploadFile, limit: int) -> tuple[str, bytes]:
    """(safe name, content) of an uploaded file; raises ApiError 415 (type), 413 (size) or 400 (name)."""
    raw = upload.filename or ""
    name = upload_name(raw)
    if upload.size is not None and upload.size > limit:
        raise ApiError(413, f"{raw!r} is larger than the upload limit of {_size(limit)}", "files")
    content = await upload.read(limit + 1)
    if len(content) > limit:
        raise ApiError(413, f"{raw!r} is larger than the upload limit of {_size(limit)}", "files")
    if name.endswith(IMAGE_EXTS):
        try:
            with Image.open(io.BytesIO(content)) as image:
                image.verify()
            with Image.open(io.BytesIO(content)) as image:
                image.load()  # verify() misses truncated pixel data
        except Exception:  # noqa: BLE001 - whatever Pillow raises, the file is not an image it can read
            raise ApiError(
                415, f"{raw!r} is not an image Pillow can open; upload a png, jpg, webp or bmp", "files"
            ) from None
    return name, content


def _size(limit: int) -> str:
    return f"{limit / 1e6:g} MB" if limit >= 1e6 else f"{limit} bytes"


# --- who may ask ----------------------------------------------------------------------------------------------------


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers a request may carry; None (any) when the server listens on every interface."""
    if host in EVERY_INTERFACE:
        return None
    names = {name if ":" not in name else f"[{name}]" for name in (*LOOPBACK, host)}
    hosts = {f"{name}:{port}" for name in names}
    return hosts | names if port == 80 else hosts


def is_loopback(host: str) -> bool:
    return host in LOOPBACK


def token_matches(request: Request, token: str) -> bool:
    auth = request.headers.get("authorization", "")
    given = [auth[7:].strip()] if auth[:7].lower() == "bearer " else []
    given.append(request.cookies.get(COOKIE, ""))
    return any(hmac.compare_digest(g.encode(), token.encode()) for g in given if g)


def _is_open(request: Request) -> bool:
    path = request.url.path
    return path == "/login" or path.startswith("/static/") or (path == "/api/login" and request.method == "POST")


def refusal(request: Request, hosts: set[str] | None, token: str | None) -> Response | None:
    """The answer to a request that may not go on, or None."""
    host = request.headers.get("host", "").lower()
    if hosts is not None and host not in hosts:
        return error_response(400, f"Host {host!r} is not this server; open it as http://{sorted(hosts)[0]}/")
    origin = request.headers.get("origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host):
        return error_response(403, f"requests from {origin} are refused; use the UI's own pages")
    if token is None or _is_open(request) or token_matches(request, token):
        return None
    path = request.url.path
    if path.startswith(("/api/", "/files/")):
        return error_response(401, "missing or wrong token; log in at /login or send Authorization: Bearer <token>")
    return RedirectResponse("/login", status_code=303)


class Guard:
    """ASGI middleware applying ``refusal`` to every HTTP request."""

    def __init__(self, app, hosts: set[str] | None, token: str | None):
        self.app, self.hosts, self.token = app, hosts, token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            response = refusal(Request(scope), self.hosts, self.token)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
