"""Who may talk to the UI server, and which files a request may touch.

- ``Guard`` (ASGI middleware) checks every HTTP request in this order: the ``Host`` header must be a name the server
  is bound as (400; a server bound to every interface takes any Host, its token protects it), an ``Origin`` header
  must name that same host (403: another site's page may not drive this one), and with a token the request must
  carry it as ``Authorization: Bearer``, or carry the ``zl_token`` cookie of a sign-in (401 JSON for ``/api`` and
  ``/files``, a redirect to ``/login`` for pages). ``/login``, ``POST /api/login`` and ``/static/*`` are open.
- ``Sessions``: signing in with the token gives the browser a random session id as its cookie, never the token;
  signing out forgets that id, so the old cookie gets 401 from then on (a server restart signs everyone out).
- ``resolve_inside`` turns a URL path into a regular file inside a folder, refusing ``..``, absolute paths,
  percent-encoded leftovers and symlinks that lead out.
- ``check_name`` and ``upload_name`` keep job, dataset and file names to ``job.name``'s rule.
- ``read_upload`` enforces the upload types (Pillow must open an image) and the size limit.
- ``receive_files`` streams large uploads (LoRA files) straight into temporary files of their destination folder,
  refusing a body over the limit before it is read (by its Content-Length) or while it arrives; a cut-off or refused
  upload leaves no file behind.
"""

from __future__ import annotations

import hmac
import io
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from PIL import Image
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
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


def upload_name(raw: str, exts: tuple[str, ...] = UPLOAD_EXTS) -> str:
    """A safe name for an uploaded file: the name's rule, the extension kept (lower case); raises ApiError."""
    suffix = PurePosixPath(raw).suffix.lower() if raw else ""
    if suffix not in exts:
        raise ApiError(415, f"{raw!r}: only {', '.join(exts)} files can be uploaded", "files")
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


MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the files themselves
TEMP_PREFIX = ".upload-"  # a received file before it is checked and renamed (a server killed mid-upload leaves one)


@dataclass
class Received:
    """One file part of a streamed upload: the name it was sent as, its safe name, and the temporary file holding it
    (in the destination folder) or why it was refused (``temp`` is then None)."""

    raw: str
    name: str = ""
    temp: Path | None = None
    error: ApiError | None = None
    size: int = 0
    ended: bool = False


class _Receiver:
    """python-multipart's callbacks for ``receive_files``: each file part of ``field`` into its own temporary file."""

    def __init__(self, folder: Path, limit: int, exts: tuple[str, ...], field: str):
        self.folder, self.limit, self.exts, self.field = folder, limit, exts, field
        self.parts: list[Received] = []
        self.part: Received | None = None
        self.handle = None
        self.headers: dict[bytes, bytes] = {}
        self.header = [b"", b""]
        self.finished = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.begin,
            "on_header_field": lambda data, start, end: self._add_header(0, data[start:end]),
            "on_header_value": lambda data, start, end: self._add_header(1, data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.data,
            "on_part_end": self.end,
            "on_end": self.all_done,
        }

    def begin(self) -> None:
        self.part, self.headers, self.header = None, {}, [b"", b""]

    def _add_header(self, index: int, data: bytes) -> None:
        self.header[index] += data

    def header_end(self) -> None:
        self.headers[self.header[0].lower()] = self.header[1]
        self.header = [b"", b""]

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if options.get(b"name", b"").decode("utf-8", "replace") != self.field:
            return  # another form field: ignored
        if b"filename" not in options:
            error = ApiError(400, f"a part of {self.field!r} has no file name; send files, not text", self.field)
            self.parts.append(Received("", error=error, ended=True))
            return
        part = Received(options[b"filename"].decode("utf-8", "replace"))
        self.parts.append(part)
        try:
            part.name = upload_name(part.raw, self.exts)
        except ApiError as e:
            part.error = e
            return
        part.temp = self.folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}.tmp"
        self.handle = open(part.temp, "wb")  # noqa: SIM115 - closed at the part's end, or by discard()
        self.part = part

    def data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        if part is None or self.handle is None:
            return
        part.size += end - start
        if part.size > self.limit:
            self._drop(part, ApiError(413, f"{part.raw!r} is larger than the upload limit of {_size(self.limit)}"))
            return
        self.handle.write(data[start:end])

    def end(self) -> None:
        if self.part is not None and self.handle is not None:
            self.handle.close()
            self.handle = None
        for part in self.parts[-1:]:
            part.ended = True
        self.part = None

    def all_done(self) -> None:
        self.finished = True

    def _drop(self, part: Received, error: ApiError) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if part.temp is not None:
            part.temp.unlink(missing_ok=True)
        part.temp, part.error = None, ApiError(error.status, error.message, self.field)
        self.part = None

    def sync(self) -> None:
        """fsync each received file (before the caller renames it: a crash leaves the old file or the whole new one)."""
        for part in self.parts:
            if part.temp is not None:
                fd = os.open(part.temp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def discard(self) -> None:
        """Remove every temporary file (the upload failed as a whole)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        for part in self.parts:
            if part.temp is not None:
                part.temp.unlink(missing_ok=True)
                part.temp = None


async def receive_files(
    request: Request, folder: Path, limit: int, exts: tuple[str, ...], field: str = "files"
) -> list[Received]:
    """The file parts of ``field`` in a multipart request, each streamed into a temporary file in ``folder`` (so the
    caller can check it, then rename it: the same file system). A file over ``limit`` bytes, or of another type, is
    a refused part; a body over ``limit`` (plus the multipart overhead) is refused whole with 413, before it is
    read when its Content-Length says so; a cut-off body removes every temporary file and raises ApiError 400."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(422, f"{field}: send the files as multipart/form-data field {field!r}", field)
    too_big = ApiError(413, f"the upload is larger than the limit of {_size(limit)}; send the files one by one", field)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        raise too_big
    folder.mkdir(parents=True, exist_ok=True)
    receiver = _Receiver(folder, limit, exts, field)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit + MULTIPART_OVERHEAD:
                raise too_big
            parser.write(chunk)
        parser.finalize()
        if not receiver.finished or not all(part.ended for part in receiver.parts):
            raise ApiError(400, "the upload was cut off before its end; send the files again", field)
        await run_in_threadpool(receiver.sync)
    except MultipartParseError:
        receiver.discard()
        message = f"the upload is not valid multipart/form-data; send the files as field {field!r}"
        raise ApiError(400, message, field) from None
    except BaseException:
        receiver.discard()
        raise
    return receiver.parts


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


class Sessions:
    """The signed-in browsers: a random id per sign-in (the cookie), kept in memory for ``max_age_s`` and forgotten
    at sign-out. The oldest go first beyond ``limit``, so repeated sign-ins cannot grow the set without bound."""

    def __init__(self, max_age_s: float = 30 * 24 * 3600, limit: int = 1000):
        self.max_age_s, self.limit = max_age_s, limit
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def open(self) -> str:
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._ids[session] = time.monotonic() + self.max_age_s
            while len(self._ids) > self.limit:
                self._ids.pop(next(iter(self._ids)))
        return session

    def valid(self, session: str) -> bool:
        with self._lock:
            expires = self._ids.get(session)
            if expires is not None and expires < time.monotonic():
                self._ids.pop(session, None)
                expires = None
        return expires is not None

    def close(self, session: str) -> None:
        with self._lock:
            self._ids.pop(session, None)


def token_matches(request: Request, token: str, sessions: Sessions) -> bool:
    """The request carries the token (``Authorization: Bearer``) or the cookie of a sign-in not signed out."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return True
    return sessions.valid(request.cookies.get(COOKIE, ""))


def _is_open(request: Request) -> bool:
    path = request.url.path
    return path == "/login" or path.startswith("/static/") or (path == "/api/login" and request.method == "POST")


def refusal(request: Request, hosts: set[str] | None, token: str | None, sessions: Sessions) -> Response | None:
    """The answer to a request that may not go on, or None."""
    host = request.headers.get("host", "").lower()
    if hosts is not None and host not in hosts:
        return error_response(400, f"Host {host!r} is not this server; open it as http://{sorted(hosts)[0]}/")
    origin = request.headers.get("origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host):
        return error_response(403, f"requests from {origin} are refused; use the UI's own pages")
    if token is None or _is_open(request) or token_matches(request, token, sessions):
        return None
    path = request.url.path
    if path.startswith(("/api/", "/files/")):
        return error_response(401, "missing or wrong token; log in at /login or send Authorization: Bearer <token>")
    return RedirectResponse("/login", status_code=303)


class Guard:
    """ASGI middleware applying ``refusal`` to every HTTP request."""

    def __init__(self, app, hosts: set[str] | None, token: str | None, sessions: Sessions):
        self.app, self.hosts, self.token, self.sessions = app, hosts, token, sessions

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            response = refusal(Request(scope), self.hosts, self.token, self.sessions)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
