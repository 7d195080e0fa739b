"""The web UI's HTTP server: ``create_app`` builds the FastAPI app of docs/ui-api.md; ``serve`` runs it.

Routes, grouped as in the contract: pages, schema and config, jobs (with the event stream, the AI Toolkit import,
checkpoints converted to another tool's layout), comparisons, datasets, captioning runs (a captioning model's
proposals for a dataset, accepted image by image), models, LoRAs (uploaded into DATA/loras, listed read-only from
the ``--lora-dir`` folders, inspected) and the playground, files. Handlers stay thin: the config goes through
``schema`` (the CLI's validation), status changes through ``runner`` (the queue), run folders are read through
``runs``, LoRA files through the format registry (``lora/formats.py``, ``lora/tools.py``), and every path from a URL
through ``security.resolve_inside`` (a LoRA path through ``Ui.lora_file``). A user mistake answers 4xx ``{"error":
one sentence, "field": key or null}``; an unexpected failure answers 500 with a sentence, never a traceback.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import json
import mimetypes
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from zimage_lora.config import ConfigError, apply_overrides, dump_yaml, job_to_dict, parse_job, parse_resolutions
from zimage_lora.errors import UserError
from zimage_lora.files import atomic_write_bytes, fsync_dir
from zimage_lora.models.arch import ARCHS, DEFAULT_INFERENCE_ARCH, inference_arch
from zimage_lora.sampling.request import GenerationRequest
from zimage_lora.training.run_folder import RunFolder
from zimage_lora.ui import runs, schema
from zimage_lora.ui.db import Store, now
from zimage_lora.ui.runner import ACTIVE, PROPOSALS, Runner, device_set, error_headline, machine_devices
from zimage_lora.ui.security import (
    COOKIE,
    IMAGE_EXTS,
    NAME_RE,
    TEMP_PREFIX,
    UPLOAD_EXTS,
    ApiError,
    Guard,
    Received,
    Sessions,
    allowed_hosts,
    check_name,
    error_response,
    read_upload,
    receive_files,
    resolve_inside,
)

STATIC = Path(__file__).parent / "static"
FILE_ROOTS = ("datasets", "jobs", "models", "generations", "comparisons", "loras")  # what /files serves; never ui.db
LORA_DIRS = "lora-dirs"  # ``lora-dirs/<index>/<file>``: a file of the index-th --lora-dir folder (read-only)
CONVERTED = ".converted"  # DATA/.converted/<job>/: checkpoints converted to another layout for a download
MAX_FOLDER_LORAS = 5000  # a --lora-dir folder lists at most this many files
INSPECT_CACHE = 256  # inspect reports kept (by file, mtime, size and model)
LOG_TAIL = 40
THUMB_SIZE = 256
HEARTBEAT_S = 10.0
IMPORT_MAX_CHARS = 1_000_000  # an AI Toolkit job file is a few KB
FIXED_SETTINGS = ("version", "job.name", "job.output_dir", "job.device")  # what a comparison cannot vary
LOGIN_FORM = """<!doctype html><meta charset="utf-8"><title>zimage-lora: sign in</title>
<form method="post" action="/api/login"><label>Token <input name="token" type="password" autofocus></label>
<button>Sign in</button></form>"""


class Ui:
    """What every handler needs: the data folder, the store, the runner, the limits and the read-only LoRA folders."""

    def __init__(
        self,
        data: Path,
        token: str | None,
        max_upload_bytes: int,
        poll_s: float,
        lora_dirs: list[Path] | None = None,
        max_lora_bytes: int = 2_000_000_000,
    ):
        self.data = data
        self.token = token
        self.sessions = Sessions()
        self.max_upload_bytes = max_upload_bytes
        self.max_lora_bytes = max_lora_bytes
        self.lora_dirs = lora_dirs or []
        self.store = Store(data)
        self.runner = Runner(data, self.store, poll_s)
        for folder in FILE_ROOTS:
            (data / folder).mkdir(exist_ok=True)
        for stale in (data / "loras").glob(f"{TEMP_PREFIX}*.tmp"):  # an upload the last server was killed in
            stale.unlink(missing_ok=True)
        self.cache_lock = threading.Lock()
        self.convert_lock = threading.Lock()  # conversions are rare; one at a time keeps their .tmp files apart
        self.names: dict[tuple, Any] = {}
        self.reports: dict[tuple, dict[str, Any]] = {}

    def job(self, name: str) -> dict[str, Any]:
        row = self.store.get("jobs", name) if NAME_RE.match(name) else None
        if row is None:
            raise ApiError(404, f"no job named {name!r}; see GET /api/jobs", "name")
        return row

    def dataset(self, name: str) -> Path:
        folder = self.data / "datasets" / check_name(name, "dataset")
        if not folder.is_dir():
            raise ApiError(404, f"no dataset named {name!r}; create it with POST /api/datasets", "name")
        return folder

    def validated(self, config: Any) -> dict[str, Any]:
        """The UI's config, normalised; ApiError 422 with the CLI's message for the first problem."""
        normalised, errors = schema.validate(config, self.data)
        if errors:
            raise ApiError(422, errors[0]["message"], errors[0]["key"], errors=errors)
        return normalised

    def write_job_yaml(self, name: str, config: dict[str, Any], folder: Path | None = None) -> None:
        """The job file the trainer reads, in the job's folder (or ``folder``: a comparison's snapshot)."""
        cfg = parse_job(schema.job_data(config, self.data), self.data, check_paths=False)
        _atomic_write((folder or self.runner.job_dir(name)) / "job.yaml", dump_yaml(cfg).encode())

    def comparison(self, cmp_id: str) -> dict[str, Any]:
        row = self.store.get("comparisons", cmp_id) if NAME_RE.match(cmp_id) else None
        if row is None:
            raise ApiError(404, f"no comparison {cmp_id!r}; see GET /api/comparisons", "id")
        return row

    def caption_run(self, cap_id: str) -> dict[str, Any]:
        row = self.store.get("captions", cap_id) if NAME_RE.match(cap_id) else None
        if row is None:
            raise ApiError(404, f"no captioning run {cap_id!r}; see GET /api/datasets/<name>/captions", "id")
        return row

    # --- LoRA files -------------------------------------------------------------------------------------------------

    def lora_file(self, path: str, field: str) -> Path:
        """The file a LoRA path names: ``lora-dirs/<index>/<file>`` inside the index-th --lora-dir folder, anything
        else a ``.safetensors`` file inside DATA (``jobs/<job>/<file>``, ``loras/<file>``); ApiError 422 naming
        ``field`` otherwise. The client never sends an absolute path."""
        head, _, rest = path.partition("/")
        found = None
        if head == LORA_DIRS:
            index, _, relative = rest.partition("/")
            listed = not any(part.startswith(".") for part in relative.split("/"))  # hidden: not listed, not served
            if listed and re.fullmatch(r"[0-9]{1,4}", index) and int(index) < len(self.lora_dirs):
                found = resolve_inside(self.lora_dirs[int(index)], relative)
        else:
            found = resolve_inside(self.data, path)
        if found is None or found.suffix.lower() != ".safetensors":
            raise ApiError(422, f"{field}: {path!r} is not a LoRA file the UI lists (GET /api/loras)", field)
        return found

    def transformer(self, model: str | None, field: str = "model") -> tuple[Any, str]:
        """(the transformer's layer names, its label) that LoRA files are checked against: DATA/models/<name> for
        ``models/<name>``, else (a hub id, nothing) the real Z-Image's. Cached: the meta-device build takes a second
        or two."""
        from zimage_lora.lora.formats import transformer_names

        folder = None
        if model and model.startswith("models/"):
            folder = self.data / "models" / model.removeprefix("models/")
            if not NAME_RE.match(folder.name) or folder.parent != self.data / "models" or not folder.is_dir():
                raise ApiError(422, f"{field}: no folder {model!r} in the data folder; see GET /api/models", field)
        config = None if folder is None else folder / "transformer" / "config.json"
        key = (str(config), config.stat().st_mtime_ns if config is not None and config.is_file() else None)
        with self.cache_lock:
            found = self.names.get(key)
        if found is None:
            try:
                names = transformer_names(folder)
                found = (names, model if folder is not None else names.source)
            except UserError:
                message = f"{field}: {model} has no transformer/config.json; it is not a diffusers model folder"
                raise ApiError(422, message, field) from None
            with self.cache_lock:
                self.names[key] = found
        return found

    def inspect(self, file: Path, listed: str, model: str | None, field: str = "path") -> dict[str, Any]:
        """``lora inspect``'s report of ``file`` (shown as ``listed``) for ``model``, with its one-line ``summary``
        and ``warnings``; cached by the file (its inode: an upload keeps its report when renamed into place), mtime,
        size and model. ApiError 422 with inspect's sentence when the file is not a LoRA for that model."""
        from zimage_lora.lora.tools import inspect_lora

        names, label = self.transformer(model)
        stat = file.stat()
        key = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size, id(names))  # names: kept in self.names
        with self.cache_lock:
            cached = self.reports.get(key)
        if cached is not None:
            return {**cached, "file": listed}
        try:
            report = inspect_lora(file, names)
        except UserError as e:
            raise ApiError(422, str(e).replace(str(file), listed), field) from None
        report = {**report, "file": listed, "model": label}
        report |= lora_notes(report)
        with self.cache_lock:
            while len(self.reports) >= INSPECT_CACHE:
                self.reports.pop(next(iter(self.reports)))
            self.reports[key] = report
        return report

    def converted(self, job: dict[str, Any], source: Path, fmt: str) -> Path:
        """A checkpoint of ``job`` in format ``fmt``, in its saved dtype, converted once into DATA/.converted/<job>/
        (keyed by the checkpoint's mtime and size: a new run's checkpoint of the same name is converted afresh)."""
        from zimage_lora.lora.tools import convert_lora

        stat = source.stat()
        key = hashlib.sha256(f"{source}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
        folder = self.data / CONVERTED / job["name"]
        out = folder / f"{source.stem}_{fmt}_{key}.safetensors"
        with self.convert_lock:
            if out.is_file():
                return out
            model = job["config"]["model"]["name_or_path"]
            names, _ = self.transformer(model if model and model.startswith("models/") else None, "model.name_or_path")
            folder.mkdir(parents=True, exist_ok=True)
            try:
                convert_lora(source, out, fmt, _saved_dtype(source), names)
            except UserError as e:
                raise ApiError(422, f"format: {e}".replace(str(self.data) + "/", ""), "format") from None
            for old in folder.glob(f"{source.stem}_{fmt}_*.safetensors"):  # earlier runs' conversions
                if old != out:
                    old.unlink(missing_ok=True)
        return out


def lora_notes(report: dict[str, Any]) -> dict[str, Any]:
    """inspect's report as the playground shows it: one line (format, modules, ranks, trigger word) and what will
    not apply (modules no layer of the model has; keys diffusers' or ComfyUI's loader drops or refuses)."""
    ranks = "/".join(map(str, report["ranks"]))
    trigger = report["metadata"].get("trigger word")
    parts = [
        report["format_label"],
        report["kind"] if report["kind"] != "lora" else None,
        f"{report['modules']} modules",
        f"rank {ranks}" if ranks else None,
        f"trigger word {trigger}" if trigger else "no trigger word recorded",
    ]
    warnings = []
    if report["unmatched"]:
        warnings.append(
            f"{len(report['unmatched'])} of its modules match no layer of {report['model']} (e.g. "
            f"{report['unmatched'][0]}); generating with it on this model fails"
        )
    for loader, label in (("diffusers", "diffusers"), ("comfyui", "ComfyUI")):
        count = report["loaders"][loader]
        if count["refused"]:
            warnings.append(f"{label} refuses the file: {count['refused']}")
            continue
        if count["dropped"]:
            warnings.append(f"{label} drops {count['dropped']} of its keys (e.g. {count['dropped_keys'][0]})")
        missing = [w for w in count["warnings"] if w.startswith("NOT LOADED")]
        if missing:
            warnings.append(f"{label} does not load {len(missing)} patches: {missing[0]}")
    return {"summary": ", ".join(p for p in parts if p), "warnings": warnings}


def _saved_dtype(path: Path) -> str:
    """The save dtype (fp32, bf16, fp16) of a LoRA file's weights, from its header."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    for name, dtype in (("F32", "fp32"), ("BF16", "bf16"), ("F16", "fp16")):
        if name in dtypes:
            return dtype
    return "fp32"


def _download(path: Path, filename: str) -> FileResponse:
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
    return FileResponse(path, media_type="application/octet-stream", filename=filename, headers=headers)


_WRITES = threading.Lock()  # handlers run on a thread pool; two writes of one file must not share its .tmp


def _atomic_write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _WRITES:
        atomic_write_bytes(path, content)


def _url(*parts: str) -> str:
    return "/" + "/".join(quote(part) for part in parts)


# --- request bodies ---------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigBody(_Body):
    config: dict[str, Any]


class ValidateBody(_Body):
    config: dict[str, Any] | None = None
    yaml: str | None = None


class NameBody(_Body):
    name: str


class StopBody(_Body):
    force: bool = False


class CaptionBody(_Body):
    caption: str


class ImportBody(_Body):
    text: str
    filename: str | None = None


class CompareBody(_Body):
    setting: str
    values: list[Any]


class CaptionRunBody(_Body):
    """A captioning run's options, as ``zimage-lora caption`` takes them; null: the captioner's default."""

    model: str | None = None
    mode: str | None = None
    trigger: str | None = None
    trigger_style: str | None = None
    max_words: int | None = Field(None, ge=1)
    overwrite: bool = False
    device: str = "auto"


class AcceptItem(_Body):
    file: str
    caption: str
    overwrite: bool = False


class AcceptBody(_Body):
    items: list[AcceptItem]


# --- the app ----------------------------------------------------------------------------------------------------------


def create_app(
    data_dir: str | os.PathLike[str],
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8675,
    max_upload_bytes: int = 50_000_000,
    poll_s: float = 0.5,
    lora_dirs: list[str | os.PathLike[str]] | tuple = (),
    max_lora_upload_bytes: int = 2_000_000_000,
) -> FastAPI:
    """The UI for the data folder ``data_dir`` (created if missing), as served on ``host:port``; the
    ``.safetensors`` files of ``lora_dirs`` are offered read-only beside the data folder's LoRAs. Uploads are
    limited to ``max_upload_bytes`` per file (dataset images and captions) and ``max_lora_upload_bytes`` (a LoRA
    upload)."""
    folders = []
    for given in lora_dirs:
        folder = Path(given).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"--lora-dir {given}: no such folder; give a folder that holds .safetensors LoRA files")
        folders.append(folder)
    ui = Ui(
        Path(data_dir).expanduser().resolve(), token or None, max_upload_bytes, poll_s, folders, max_lora_upload_bytes
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ui.runner.start()
        # Counting the GPUs imports torch (seconds): done now, so the first job form does not wait for it.
        threading.Thread(target=machine_devices, name="count-gpus", daemon=True).start()
        try:
            yield
        finally:
            ui.runner.close()
            ui.store.close()

    app = FastAPI(title="zimage-lora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = ui
    app.add_middleware(Guard, hosts=allowed_hosts(host, port), token=ui.token, sessions=ui.sessions)
    _error_handlers(app)
    _page_routes(app, ui)
    _config_routes(app, ui)
    _job_routes(app, ui)
    _comparison_routes(app, ui)
    _dataset_routes(app, ui)
    _caption_routes(app, ui)
    _playground_routes(app, ui)
    _file_routes(app, ui)
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "field": exc.field, **exc.extra}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"nothing at {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"] if part not in ("body", "query", "path")]
        field = ".".join(loc) or None
        message = error["msg"][0].lower() + error["msg"][1:] if error["msg"] else "invalid"
        return error_response(422, f"{field or 'request body'}: {message}", field)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__}); the server's log has the details")


# --- pages ------------------------------------------------------------------------------------------------------------


def _page_routes(app: FastAPI, ui: Ui) -> None:
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = STATIC / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse("<p>zimage-lora: the UI's pages are missing.</p>")

    @app.get("/login", include_in_schema=False)
    def login_page() -> Response:
        page = STATIC / "login.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(LOGIN_FORM)

    @app.post("/api/login")
    async def login(request: Request) -> Response:
        from_form = not request.headers.get("content-type", "").startswith("application/json")
        try:
            body = dict(await request.form()) if from_form else await request.json()
        except ValueError:
            body = {}
        given = body.get("token") if isinstance(body, dict) else None
        if ui.token is not None and given != ui.token:
            if from_form:
                return RedirectResponse("/login?error=1", status_code=303)
            return error_response(401, "wrong token; use the one the server was started with (--token)", "token")
        response = RedirectResponse("/", status_code=303) if from_form else JSONResponse({"ok": True})
        if ui.token is not None:
            response.set_cookie(COOKIE, ui.sessions.open(), httponly=True, samesite="strict", path="/")
        return response

    @app.post("/api/logout")
    def logout(request: Request) -> Response:
        """Sign out: this browser's session is forgotten (its cookie gets 401 from now on) and the cookie deleted."""
        ui.sessions.close(request.cookies.get(COOKIE, ""))
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/api/session")
    def session(request: Request) -> dict:
        """Whether this server asks for a token, and whether this request came in with a sign-in's cookie (the
        pages then offer Sign out)."""
        signed_in = ui.token is not None and ui.sessions.valid(request.cookies.get(COOKIE, ""))
        return {"token_required": ui.token is not None, "signed_in": signed_in}


# --- schema and config ------------------------------------------------------------------------------------------------


def _config_routes(app: FastAPI, ui: Ui) -> None:
    @app.get("/api/schema")
    def get_schema() -> dict:
        return schema.schema()

    @app.get("/api/devices")
    def get_devices() -> dict:
        """The machine's devices, for the job form's device picker and the playground."""
        return {"devices": machine_devices()}

    @app.get("/api/presets")
    def get_presets() -> dict:
        return {"presets": schema.presets(ui.data)}

    @app.post("/api/config/validate")
    def validate(body: ValidateBody) -> dict:
        if (body.config is None) == (body.yaml is None):
            raise ApiError(400, 'send either {"config": {...}} or {"yaml": "..."}', "config")
        raw, errors = (body.config, []) if body.yaml is None else schema.parse_yaml(body.yaml)
        config, warnings = None, []
        if not errors:
            config, errors = schema.validate(raw, ui.data, warnings=warnings)
        if not errors:  # the job trains here: a device this machine lacks is a problem now, not when it starts
            try:
                device_set(config["job"]["device"], "job.device")
            except ApiError as e:
                errors = [{"key": "job.device", "message": e.message}]
        if errors:  # the text as it stands, so either view can show it while the user fixes the problem
            text = body.yaml if body.yaml is not None else yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
            return {
                "ok": False,
                "errors": errors,
                "warnings": [],
                "config": raw if isinstance(raw, dict) else None,
                "yaml": text,
            }
        return {"ok": True, "errors": [], "warnings": warnings, "config": config, "yaml": schema.config_yaml(config)}


# --- jobs -------------------------------------------------------------------------------------------------------------


def _devices_text(row: dict[str, Any]) -> str:
    """The devices the job holds since it was queued (``cuda:0, cuda:1``), else the ones its config names."""
    device = row["config"]["job"]["device"]
    return ", ".join(row["device"].split(",") if row["device"] else [device] if isinstance(device, str) else device)


def job_summary(ui: Ui, row: dict[str, Any], progress: dict[str, Any] | None = None) -> dict[str, Any]:
    config = row["config"]
    folder = ui.runner.job_dir(row["name"])
    progress = progress or runs.progress(folder, config["train"]["steps"], row["status"] == "running")
    return {
        "name": row["name"],
        "status": row["status"],
        "step": progress["step"],
        "steps": progress["steps"],
        "device": _devices_text(row),
        "arch": config["model"]["arch"],
        "arch_label": ARCHS[config["model"]["arch"]].label,
        "created": row["created"],
        "started": row["started"],
        "finished": row["finished"],
        "resumable": _resumable(folder),
    }


def job_detail(ui: Ui, row: dict[str, Any]) -> dict[str, Any]:
    folder = ui.runner.job_dir(row["name"])
    progress = runs.progress(folder, row["config"]["train"]["steps"], row["status"] == "running")
    return {
        **job_summary(ui, row, progress),
        **progress,
        "config": row["config"],
        "yaml": schema.config_yaml(row["config"]),
        "error": row["error"],
        "exit_code": row["exit_code"],
        "log_tail": runs.log_tail(runs.log_path(folder), LOG_TAIL),
    }


def _resumable(folder: Path) -> bool:
    """Whether the run folder holds a saved training state that Resume continues from."""
    return bool(RunFolder(folder, folder.name).states())


def _job_routes(app: FastAPI, ui: Ui) -> None:
    runner = ui.runner

    @app.get("/api/jobs")
    def list_jobs() -> dict:
        return {"jobs": [job_summary(ui, row) for row in ui.store.select("jobs")]}

    @app.post("/api/jobs/import")
    def import_job(body: ImportBody) -> dict:
        """An AI Toolkit job file as the new-job form's config, with what was mapped, converted or left out."""
        from zimage_lora.aitoolkit import import_job_text

        if len(body.text) > IMPORT_MAX_CHARS:
            raise ApiError(413, "text: the file is over 1 MB; an AI Toolkit job file is a few KB", "text")
        try:
            imported = import_job_text(body.text, body.filename or "the imported file")
        except UserError as e:
            raise ApiError(422, str(e), "text") from None
        raw = _in_data_folder(imported.data, ui.data)
        config, errors = schema.validate(raw, ui.data)
        # an invalid job lands in the form as imported, where each problem shows beside its field
        return {"config": config or raw, "findings": [f.as_dict() for f in imported.findings], "errors": errors}

    @app.post("/api/jobs", status_code=201)
    def create_job(body: ConfigBody) -> dict:
        config = ui.validated(body.config)
        name = config["job"]["name"]
        if ui.store.get("jobs", name) is not None or runner.job_dir(name).exists():
            raise ApiError(409, f"a job named {name!r} exists already; choose another job.name", "job.name")
        ui.write_job_yaml(name, config)
        ui.store.insert("jobs", name=name, config=config, status="draft", created=now())
        return {"name": name}

    @app.get("/api/jobs/{name}")
    def get_job(name: str) -> dict:
        return job_detail(ui, ui.job(name))

    @app.put("/api/jobs/{name}")
    def update_job(name: str, body: ConfigBody) -> dict:
        ui.job(name)
        config = ui.validated(body.config)
        if config["job"]["name"] != name:
            raise ApiError(
                422, f"job.name: a job cannot be renamed ({name!r}); clone it under the new name", "job.name"
            )
        with runner.lock:
            status = ui.job(name)["status"]
            if status in ("queued", *ACTIVE):
                raise ApiError(409, f"job {name!r} is {status}; stop it before changing its config")
            ui.write_job_yaml(name, config)
            ui.store.update("jobs", name, config=config, device=None)  # the list shows the new config's devices
        return {"name": name}

    @app.post("/api/jobs/{name}/clone", status_code=201)
    def clone_job(name: str, body: NameBody) -> dict:
        config = ui.job(name)["config"]
        new = check_name(body.name, "job")
        if ui.store.get("jobs", new) is not None or runner.job_dir(new).exists():
            raise ApiError(409, f"a job named {new!r} exists already; choose another name", "name")
        config = ui.validated({**config, "job": {**config["job"], "name": new}})
        ui.write_job_yaml(new, config)
        ui.store.insert("jobs", name=new, config=config, status="draft", created=now())
        return {"name": new}

    def queue(name: str, resume: bool) -> dict:
        with runner.lock:
            row = ui.job(name)
            if row["status"] in ("queued", *ACTIVE):
                raise ApiError(409, f"job {name!r} is already {row['status']}; stop it first")
            config = ui.validated(row["config"])  # the data folder may have changed since it was saved
            ui.write_job_yaml(name, config)
            runner.queue_job(name, resume=resume)
        return {"name": name, "status": ui.job(name)["status"]}

    @app.post("/api/jobs/{name}/start")
    def start_job(name: str) -> dict:
        return queue(name, resume=False)

    @app.post("/api/jobs/{name}/resume")
    def resume_job(name: str) -> dict:
        if not _resumable(runner.job_dir(name)) and ui.job(name)["status"] not in ("queued", *ACTIVE):
            message = f"job {name!r} has no saved state to resume from (it ended before its first save); start it over"
            raise ApiError(409, message)
        return queue(name, resume=True)

    @app.post("/api/jobs/{name}/stop")
    def stop_job(name: str, body: StopBody | None = None) -> dict:
        ui.job(name)
        runner.stop_job(name, force=body is not None and body.force)
        return {"name": name, "status": ui.job(name)["status"]}

    @app.post("/api/jobs/{name}/save")
    def save_now(name: str) -> dict:
        ui.job(name)
        runner.request(name, "save")
        return {"name": name, "requested": "save"}

    @app.post("/api/jobs/{name}/sample")
    def sample_now(name: str) -> dict:
        ui.job(name)
        runner.request(name, "sample")
        return {"name": name, "requested": "sample"}

    @app.delete("/api/jobs/{name}")
    def delete_job(name: str, confirm: str = "") -> dict:
        ui.job(name)
        if confirm != name:
            raise ApiError(
                400, f"deleting job {name!r} removes its run folder; repeat its name in ?confirm=", "confirm"
            )
        with runner.lock:
            status = ui.job(name)["status"]
            if status in ("queued", *ACTIVE):
                raise ApiError(409, f"job {name!r} is {status}; stop it before deleting it")
            shutil.rmtree(runner.job_dir(name), ignore_errors=True)
            shutil.rmtree(ui.data / CONVERTED / name, ignore_errors=True)
            ui.store.delete("jobs", name)
        return {"deleted": name}

    @app.get("/api/jobs/{name}/metrics")
    def get_metrics(name: str, after: int | None = None) -> dict:
        ui.job(name)
        return {"metrics": runs.metrics(runner.job_dir(name), after)}

    @app.get("/api/jobs/{name}/log")
    def get_log(name: str, lines: int = 200) -> dict:
        ui.job(name)
        return {"lines": runs.log_tail(runs.log_path(runner.job_dir(name)), min(max(lines, 0), 10_000))}

    @app.get("/api/jobs/{name}/samples")
    def get_samples(name: str) -> dict:
        ui.job(name)
        return runs.samples(runner.job_dir(name), _url("files", "jobs", name))

    @app.get("/api/jobs/{name}/checkpoints")
    def get_checkpoints(name: str) -> dict:
        ui.job(name)
        return {"checkpoints": runs.checkpoints(runner.job_dir(name), name, _url("files", "jobs", name))}

    @app.get("/api/jobs/{name}/checkpoints/{file}/download")
    def download_checkpoint(name: str, file: str, fmt: str = Query("zimage-lora", alias="format")) -> Response:
        """A checkpoint as a download in another tool's layout (``lora convert``), converted once into a cache."""
        from zimage_lora.lora.formats import FORMATS

        row = ui.job(name)
        folder = runner.job_dir(name)
        if file not in {c["file"] for c in runs.checkpoints(folder, name, "")}:
            message = f"job {name!r} has no checkpoint {file!r}; see GET /api/jobs/{name}/checkpoints"
            raise ApiError(404, message, "file")
        if fmt not in FORMATS:
            raise ApiError(422, f"format: {fmt!r} is not a LoRA format; choose one of {', '.join(FORMATS)}", "format")
        source = folder / file
        if fmt == "zimage-lora":  # what the trainer wrote
            return _download(source, source.name)
        return _download(ui.converted(row, source, fmt), f"{source.stem}_{fmt}.safetensors")

    @app.get("/api/jobs/{name}/events")
    def events(name: str, request: Request, once: bool = False, max_s: float = 0, lines: int = 200) -> Response:
        ui.job(name)
        stream = _event_stream(ui, name, request, once, max_s, min(max(lines, 0), 10_000))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


def _in_data_folder(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """An imported job as the UI's config before validation: output in DATA/jobs, paths inside the data folder
    relative to it (as the form writes them); other paths stay as written, for the form to show their errors."""
    out = copy.deepcopy(data)
    if isinstance(out.get("job"), dict):
        out["job"]["output_dir"] = schema.OUTPUT_DIR

    def relative(value: Any) -> Any:
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(root):
            return Path(value).relative_to(root).as_posix()
        return value

    model = out.get("model")
    if isinstance(model, dict):
        for key in schema.MODEL_PATHS:
            if key in model:
                model[key] = relative(model[key])
    for dataset in out.get("datasets") or []:
        if isinstance(dataset, dict) and "path" in dataset:
            dataset["path"] = relative(dataset["path"])
    return out


def _sse(event: str, payload: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n"


async def _event_stream(
    ui: Ui, name: str, request: Request, once: bool, max_s: float, lines: int
) -> AsyncIterator[str]:
    """The job's changes as server-sent events, polling the run folder every half second."""
    folder = ui.runner.job_dir(name)
    url = _url("files", "jobs", name)
    sent: dict[str, Any] = {}
    state = {"step": None, "log": None}

    def changes() -> list[tuple[str, Any]]:
        row = ui.store.get("jobs", name)
        if row is None:
            return [("job", {"name": name, "status": "deleted"})]
        out = []
        for event, payload in (
            ("job", job_detail(ui, row)),
            ("samples", runs.samples(folder, url)),
            ("checkpoints", {"checkpoints": runs.checkpoints(folder, name, url)}),
        ):
            if sent.get(event) != payload:
                sent[event] = payload
                out.append((event, payload))
        rows = runs.metrics(folder)
        reset = state["step"] is not None and (not rows or rows[-1]["step"] < state["step"])
        new = rows if reset or state["step"] is None else [r for r in rows if r["step"] > state["step"]]
        if new or reset or state["step"] is None:
            out.append(("metrics", {"metrics": new, "reset": reset}))
            state["step"] = rows[-1]["step"] if rows else 0
        path = runs.log_path(folder)
        switched = state["log"] is not None and state["log"].path != path
        if state["log"] is None or switched:
            state["log"] = runs.LogFollower(path, lines)
        text, reset = state["log"].new_lines()
        reset = reset or switched  # another file: the client drops what it shows and takes these lines
        if text or reset or "log" not in sent:
            sent["log"] = True
            out.append(("log", {"lines": text, "reset": reset}))
        return out

    started = beat = time.monotonic()
    while True:
        for event, payload in await run_in_threadpool(changes):
            yield _sse(event, payload)
            if payload.get("status") == "deleted":
                return
        if once or (max_s and time.monotonic() - started >= max_s) or await request.is_disconnected():
            return
        if time.monotonic() - beat >= HEARTBEAT_S:
            beat = time.monotonic()
            yield ": heartbeat\n\n"
        await asyncio.sleep(0.5)


# --- comparisons ------------------------------------------------------------------------------------------------------


def _setting_keys(setting: str) -> list[str | int]:
    """``datasets[0].path`` / ``datasets.0.path`` as the key path ``["datasets", 0, "path"]`` (``--set``'s rule)."""
    return [int(part) if part.isdigit() else part for part in setting.replace("[", ".").replace("]", "").split(".")]


def _vary_value(value: Any) -> str:
    """A resolved value as ``--vary`` reads it back: text literally (unless it would read as YAML's null or a
    quoted string), anything else as YAML (JSON is YAML)."""
    if isinstance(value, str) and value not in ("null", "~") and not value.startswith(("'", '"')):
        return value
    return json.dumps(value)


def comparison_variants(ui: Ui, config: dict[str, Any], setting: str, values: list[Any]) -> list[str]:
    """The ``--vary`` strings of a comparison of ``config`` over ``values`` of ``setting``; ApiError 422 naming the
    setting or the value for a mistake. Each value is read as ``--set`` reads it (text literally, else YAML), the
    job with it must pass the job form's validation, and what goes to the process is the resolved value (a model
    path in the data folder, ``models/x.safetensors``, becomes absolute, as in the job file)."""
    key = setting.strip()
    if not key:
        raise ApiError(422, "setting: name the setting to compare, e.g. model.training_adapter", "setting")
    if key.replace("[", ".").replace("]", "") in FIXED_SETTINGS:
        why = "a comparison names its runs itself and holds the job's devices"
        raise ApiError(422, f"setting: {key} cannot be compared ({why}); choose another setting", "setting")
    if len(values) < 2:
        raise ApiError(422, f"values: give two or more values of {key} to compare (got {len(values)})", "values")
    varies: list[str] = []
    for index, value in enumerate(values):
        field = f"values.{index}"
        raw = value if isinstance(value, str) else json.dumps(value)
        try:
            varied = apply_overrides(config, [f"{key}={raw}"])
        except ConfigError as e:
            message = str(e)
            if " in --set " in message:  # the key is not a setting of the job
                raise ApiError(422, message.rsplit(" in --set ", 1)[0], "setting") from None  # names the key
            raise ApiError(422, f"{field}: {message}", field) from None
        normalised, errors = schema.validate(varied, ui.data)
        if errors:
            message, prefix = errors[0]["message"], f"{errors[0]['key']}: "
            problem = message.removeprefix(prefix) if errors[0]["key"] == key else f"then {message}"
            raise ApiError(422, f"{field}: {key}={raw}: {problem}", field, errors=errors)
        resolved: Any = job_to_dict(parse_job(schema.job_data(normalised, ui.data), ui.data, check_paths=False))
        for part in _setting_keys(key):
            resolved = resolved[part]
        vary = f"{key}={_vary_value(resolved)}"
        if ";" in vary:  # --vary joins several overrides with ';'
            raise ApiError(422, f"{field}: {raw!r} holds ';', which a comparison cannot pass on; rename it", field)
        if vary in varies:
            raise ApiError(422, f"{field}: {raw!r} gives the same {key} as value {varies.index(vary)}", field)
        varies.append(vary)
    return varies


def _queue_state(row: dict[str, Any]) -> dict[str, Any]:
    """Where a queued item (comparison, captioning run) stands: its status, the devices it holds, its times, its
    error and exit code."""
    return {
        "status": row["status"],
        "device": ", ".join(filter(None, (row["device"] or "").split(","))),
        "created": row["created"],
        "started": row["started"],
        "finished": row["finished"],
        "error": row["error"],
        "exit_code": row["exit_code"],
    }


def comparison_detail(ui: Ui, row: dict[str, Any]) -> dict[str, Any]:
    """The row and, once the process has written compare.json, what ``read_comparison`` reads of the folder, its
    files as /files URLs."""
    folder = ui.runner.cmp_dir(row["id"])
    url = _url("files", "comparisons", row["id"])
    out = {
        "id": row["id"],
        "job": row["job"],
        "setting": row["setting"],
        "values": row["vals"],
        "varies": row["varies"],
        **_queue_state(row),
    }
    if not (folder / "compare.json").is_file():
        return {**out, "progress": None}
    from zimage_lora.training.compare import read_comparison

    found = read_comparison(folder)

    def file_url(relative: str | None) -> str | None:
        if relative is None:
            return None
        try:  # a grid is redrawn in place: the version defeats the browser's cache
            version = (folder / relative).stat().st_mtime_ns
        except OSError:
            return None
        return f"{url}/{quote(relative)}?v={version}"

    for variant in found["variants"]:
        variant["samples"] = {step: [file_url(p) for p in paths] for step, paths in variant["samples"].items()}
    grids = [{"step": int(name.split("_")[1].split(".")[0]), "url": file_url(name)} for name in found["grids"]]
    return {**out, "progress": {**found, "grids": grids, "summary": file_url(found["summary"])}}


def _comparison_routes(app: FastAPI, ui: Ui) -> None:
    runner = ui.runner

    @app.post("/api/jobs/{name}/compare", status_code=201)
    def create_comparison(name: str, body: CompareBody) -> dict:
        """Queue the job's comparison over the values of one setting, on a snapshot of its job file."""
        config = ui.validated(ui.job(name)["config"])  # the data folder may have changed since it was saved
        if not config["sample"]["prompts"]:
            raise ApiError(
                422,
                "sample.prompts: a comparison puts previews side by side; give the job preview prompts first",
                "sample.prompts",
            )
        varies = comparison_variants(ui, config, body.setting, body.values)
        cmp_id = uuid.uuid4().hex[:12]
        folder = runner.cmp_dir(cmp_id)
        ui.write_job_yaml(name, config, folder)
        try:
            runner.add_comparison(cmp_id, name, body.setting.strip(), body.values, varies)
        except ApiError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"id": cmp_id, "status": ui.comparison(cmp_id)["status"]}

    @app.get("/api/comparisons")
    def list_comparisons(job: str | None = None) -> dict:
        rows = ui.store.select("comparisons", "job = ?", job) if job else ui.store.select("comparisons")
        out = []
        for row in rows:
            facts = runs.read_json(runner.cmp_dir(row["id"]) / "compare.json")
            variant = facts.get("variant") if row["status"] in ACTIVE else None
            out.append(
                {
                    "id": row["id"],
                    "job": row["job"],
                    "setting": row["setting"],
                    "values": row["vals"],
                    "status": row["status"],
                    "variant": variant,
                    "created": row["created"],
                    "finished": row["finished"],
                }
            )
        return {"comparisons": out}

    @app.get("/api/comparisons/{cmp_id}")
    def get_comparison(cmp_id: str) -> dict:
        row = ui.comparison(cmp_id)
        folder = runner.cmp_dir(cmp_id)
        return {**comparison_detail(ui, row), "log_tail": runs.log_tail(folder / "ui-process.log", LOG_TAIL)}

    @app.post("/api/comparisons/{cmp_id}/stop")
    def stop_comparison(cmp_id: str, body: StopBody | None = None) -> dict:
        ui.comparison(cmp_id)
        runner.stop_comparison(cmp_id, force=body is not None and body.force)
        return {"id": cmp_id, "status": ui.comparison(cmp_id)["status"]}

    @app.post("/api/comparisons/{cmp_id}/resume")
    def resume_comparison(cmp_id: str) -> dict:
        ui.comparison(cmp_id)
        runner.resume_comparison(cmp_id)
        return {"id": cmp_id, "status": ui.comparison(cmp_id)["status"]}

    @app.delete("/api/comparisons/{cmp_id}")
    def delete_comparison(cmp_id: str, confirm: str = "") -> dict:
        ui.comparison(cmp_id)
        if confirm != cmp_id:
            raise ApiError(
                400, f"deleting comparison {cmp_id!r} removes its runs; repeat its id in ?confirm=", "confirm"
            )
        with runner.lock:
            status = ui.comparison(cmp_id)["status"]
            if status in ("queued", *ACTIVE):
                raise ApiError(409, f"comparison {cmp_id!r} is {status}; stop it before deleting it")
            shutil.rmtree(runner.cmp_dir(cmp_id), ignore_errors=True)
            ui.store.delete("comparisons", cmp_id)
        return {"deleted": cmp_id}


# --- datasets ---------------------------------------------------------------------------------------------------------


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _caption(image: Path) -> str:
    from zimage_lora.data.dataset import read_caption_text

    sidecar = image.with_suffix(".txt")
    return read_caption_text(sidecar) if sidecar.is_file() else ""


def _dataset_file(folder: Path, file: str) -> Path:
    path = resolve_inside(folder, file)
    if path is None or path.suffix.lower() not in IMAGE_EXTS:
        raise ApiError(404, f"no image {file!r} in dataset {folder.name!r}", "file")
    return path


def _write_caption(image: Path, caption: str) -> None:
    """An image's caption: its ``<stem>.txt`` beside it, written atomically (an edit, or an accepted proposal)."""
    _atomic_write(image.with_suffix(".txt"), caption.encode("utf-8"))


def _orphan_captions(folder: Path) -> list[Path]:
    """The dataset's .txt files with no image of the same stem: training never reads them, so the page lists them
    to be paired (upload the image) or deleted."""
    paired = {image.with_suffix(".txt").name for image in _images(folder)}
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() == ".txt" and p.name not in paired and not p.name.startswith(".") and p.is_file()
    )


def _orphan_message(caption: Path) -> str:
    return f"{caption.name} has no image {caption.stem}.*; upload the image too or delete the caption"


def _dataset_routes(app: FastAPI, ui: Ui) -> None:
    @app.get("/api/datasets")
    def list_datasets() -> dict:
        out = []
        for folder in sorted((ui.data / "datasets").iterdir()):
            if folder.is_dir() and NAME_RE.match(folder.name):
                images = _images(folder)
                captioned = sum(1 for image in images if _caption(image))
                out.append({"name": folder.name, "images": len(images), "captioned": captioned})
        return {"datasets": out}

    @app.post("/api/datasets", status_code=201)
    def create_dataset(body: NameBody) -> dict:
        folder = ui.data / "datasets" / check_name(body.name, "dataset")
        if folder.exists():
            raise ApiError(409, f"a dataset named {body.name!r} exists already; choose another name", "name")
        folder.mkdir()
        return {"name": body.name}

    @app.delete("/api/datasets/{name}")
    def delete_dataset(name: str, confirm: str = "") -> dict:
        folder = ui.dataset(name)
        if confirm != name:
            raise ApiError(
                400, f"deleting dataset {name!r} removes its images; repeat its name in ?confirm=", "confirm"
            )
        for row in ui.store.select("jobs", "status IN ('queued', 'running', 'stopping')"):
            if any(d["path"] == f"datasets/{name}" for d in row["config"]["datasets"]):
                raise ApiError(409, f"job {row['name']!r} ({row['status']}) trains on dataset {name!r}; stop it first")
        for row in ui.store.select("captions", "dataset = ? AND status IN ('queued', 'running', 'stopping')", name):
            raise ApiError(409, f"captioning run {row['id']!r} ({row['status']}) reads dataset {name!r}; stop it first")
        shutil.rmtree(folder)
        return {"deleted": name}

    @app.get("/api/datasets/{name}")
    def get_dataset(name: str) -> dict:
        folder = ui.dataset(name)
        images = []
        for path in _images(folder):
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except Exception:  # noqa: BLE001 - an unreadable image is listed without a size
                width = height = None
            images.append(
                {
                    "file": path.name,
                    "caption": _caption(path),
                    "width": width,
                    "height": height,
                    "bytes": path.stat().st_size,
                    "url": _url("files", "datasets", name, path.name),
                    "thumb": _url("api", "datasets", name, "thumb", path.name),
                }
            )
        orphans = [
            {"file": p.name, "caption": _caption(p), "bytes": p.stat().st_size, "message": _orphan_message(p)}
            for p in _orphan_captions(folder)
        ]
        return {"name": name, "images": images, "orphan_captions": orphans, "upload_exts": list(UPLOAD_EXTS)}

    @app.post("/api/datasets/{name}/upload")
    async def upload(name: str, request: Request) -> Response:
        folder = ui.dataset(name)
        files = (await request.form()).getlist("files")
        if not files:
            raise ApiError(422, "files: send the images and captions as multipart/form-data field 'files'", "files")
        saved, rejected, first_error = [], [], None
        for upload in files:
            try:
                if not isinstance(upload, UploadFile):  # a part without a file name arrives as text
                    raise ApiError(400, "a part of 'files' has no file name; send files, not text", "files")
                file, content = await read_upload(upload, ui.max_upload_bytes)
            except ApiError as e:
                rejected.append({"file": getattr(upload, "filename", ""), "error": e.message})
                first_error = first_error or e
                continue
            await run_in_threadpool(_atomic_write, folder / file, content)
            saved.append(file)
        orphans = {p.name: p for p in _orphan_captions(folder)}  # after the whole upload: its images pair too
        result = {
            "saved": saved,
            "rejected": rejected,
            "orphan_captions": [
                {"file": file, "message": _orphan_message(orphans[file])} for file in saved if file in orphans
            ],
        }
        if saved or first_error is None:
            return JSONResponse(result)
        return JSONResponse({"error": first_error.message, "field": "files", **result}, first_error.status)

    @app.put("/api/datasets/{name}/captions/{file:path}")
    def put_caption(name: str, file: str, body: CaptionBody) -> dict:
        image = _dataset_file(ui.dataset(name), file)
        _write_caption(image, body.caption)
        return {"file": image.name, "caption": body.caption}

    @app.delete("/api/datasets/{name}/images/{file:path}")
    def delete_image(name: str, file: str) -> dict:
        image = _dataset_file(ui.dataset(name), file)
        image.unlink()
        image.with_suffix(".txt").unlink(missing_ok=True)
        return {"deleted": image.name}

    @app.delete("/api/datasets/{name}/captions/{file:path}")
    def delete_caption(name: str, file: str) -> dict:
        """A caption file: ``<file>`` is the .txt itself (an orphan caption, say) or an image whose caption goes."""
        folder = ui.dataset(name)
        path = resolve_inside(folder, file)
        if path is not None and path.suffix.lower() in IMAGE_EXTS:
            path = path.with_suffix(".txt") if path.with_suffix(".txt").is_file() else None
        if path is None or path.suffix.lower() != ".txt":
            raise ApiError(404, f"no caption file {file!r} in dataset {name!r}; see GET /api/datasets/{name}", "file")
        path.unlink()
        return {"deleted": path.name}

    @app.get("/api/datasets/{name}/thumb/{file:path}")
    def thumb(name: str, file: str) -> Response:
        from zimage_lora.data.dataset import load_rgb
        from zimage_lora.errors import UserError

        image = _dataset_file(ui.dataset(name), file)
        stat = image.stat()
        key = hashlib.sha256(f"{image}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:32]
        cached = ui.data / ".thumbs" / f"{key}.jpg"
        if not cached.is_file():
            try:
                small = load_rgb(image)
            except UserError:
                raise ApiError(415, f"{file!r} cannot be read as an image; remove or replace it", "file") from None
            small.thumbnail((THUMB_SIZE, THUMB_SIZE))
            encoded = io.BytesIO()
            small.save(encoded, format="JPEG", quality=85)
            _atomic_write(cached, encoded.getvalue())
        return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/datasets/{name}/check")
    def check(name: str, resolutions: str = "512,768,1024", trigger: str | None = None) -> dict:
        from zimage_lora.data.check import check_dataset, format_report

        folder = ui.dataset(name)
        try:
            sizes = parse_resolutions(resolutions)
        except ConfigError as e:
            raise ApiError(400, str(e), "resolutions") from None
        trigger = (trigger or "").strip() or None  # none entered: no caption is checked for a trigger
        report = check_dataset(folder, sizes, trigger)
        return {
            "report": format_report(report, trigger),
            "problems": [problem.as_dict() for problem in report.problems(trigger)],
            "groups": [group.as_dict() for group in report.groups(trigger)],
            "images": len(report.images),
            "trainable": report.trainable,
        }


# --- captioning runs --------------------------------------------------------------------------------------------------


def _captioner() -> dict[str, Any]:
    """What the caption form offers, from the captioner itself (``zimage_lora.captioning``): its default model, the
    models it documents, its modes and trigger styles with their defaults."""
    from zimage_lora.captioning import DEFAULT_MODEL, MODELS, MODES, TRIGGER_STYLES
    from zimage_lora.captioning.run import CaptionOptions

    defaults = CaptionOptions()
    return {
        "default_model": DEFAULT_MODEL,
        "models": [{"name": m.name, "hub_id": m.hub_id, "about": m.about} for m in MODELS.values()],
        "modes": list(MODES),
        "default_mode": defaults.mode,
        "trigger_styles": list(TRIGGER_STYLES),
        "default_trigger_style": defaults.trigger_style,
    }


def caption_args(ui: Ui, body: CaptionRunBody) -> tuple[dict[str, Any], list[str]]:
    """(the options as the UI keeps and shows them, the ``zimage-lora caption`` options they make); ApiError 422
    naming the field for a mistake, in the captioner's words. ``model`` is ``models/<name>`` (a folder of
    DATA/models, passed on absolute), a hub id or a name of the captioner's registry (never a path elsewhere); null
    options are the captioner's defaults. Without ``overwrite`` the captioner skips images that have a caption
    (their proposal is null; accepting never replaces one unless told)."""
    from zimage_lora.captioning.registry import known
    from zimage_lora.models.refs import is_hub_id

    facts = _captioner()
    model = (body.model or "").strip() or None
    args: list[str] = []
    if model is not None:
        if model.startswith("models/"):
            folder = ui.data / "models" / model.removeprefix("models/")
            if not NAME_RE.match(folder.name) or folder.parent != ui.data / "models" or not folder.is_dir():
                raise ApiError(422, f"model: no folder {model!r} in the data folder; see GET /api/models", "model")
            args += ["--model", str(folder)]
        elif is_hub_id(model) or known(model) is not None:
            args += ["--model", model]
        else:
            names = ", ".join(m["name"] for m in facts["models"])
            message = (
                f"model: {model!r} is neither models/<name> (a folder of the data folder), a hub id such as "
                f"{facts['default_model']} nor one of {names}"
            )
            raise ApiError(422, message, "model")
    for field, flag, allowed in (
        ("mode", "--mode", facts["modes"]),
        ("trigger_style", "--trigger-style", facts["trigger_styles"]),
    ):
        value = getattr(body, field)
        if value is not None and value not in allowed:
            raise ApiError(422, f"{field}: {value!r} is not one of {', '.join(allowed)}", field)
        if value is not None:
            args += [flag, value]
    trigger = (body.trigger or "").strip() or None
    if trigger is not None:
        if any(c.isspace() for c in trigger):
            raise ApiError(422, f"trigger: {trigger!r} is not one word; give the trigger word alone", "trigger")
        args += ["--trigger", trigger]
    if body.max_words is not None:
        args += ["--max-words", str(body.max_words)]
    args.append("--overwrite" if body.overwrite else "--skip-existing")
    options = {
        "model": model,
        "mode": body.mode,
        "trigger": trigger,
        "trigger_style": body.trigger_style,
        "max_words": body.max_words,
        "overwrite": body.overwrite,
        "device": body.device,
    }
    return options, args


def caption_summary(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "dataset": row["dataset"],
        "options": {key: value for key, value in row["options"].items() if key != "args"},
        **_queue_state(row),
    }


def _read_proposals(path: Path) -> list[dict[str, Any]]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(found, list):
        return []
    return [p for p in found if isinstance(p, dict) and isinstance(p.get("file"), str)]


def _to_caption(dataset: Path, overwrite: bool) -> int:
    """How many images of the dataset a run would caption: all with ``overwrite``, else those without a caption."""
    images = _images(dataset) if dataset.is_dir() else []
    return sum(1 for image in images if overwrite or not _caption(image))


def caption_detail(ui: Ui, row: dict[str, Any]) -> dict[str, Any]:
    """The run, its ``progress`` (images captioned of those it captions, images per second: from its progress bar
    while it runs, from its proposals once done) and, once done, its ``proposals``, each beside the image's
    thumbnail and the caption the image has now."""
    folder = ui.runner.cap_dir(row["id"])
    dataset = ui.data / "datasets" / row["dataset"]
    out = caption_summary(row)
    bar = runs.bar_progress(folder / "ui-process.log", "img") if row["status"] != "queued" else None
    progress = bar or {"done": 0, "total": _to_caption(dataset, row["options"]["overwrite"]), "per_s": None}
    proposals = None
    if row["status"] == "done":
        proposals = []
        for proposal in _read_proposals(folder / PROPOSALS):
            file = proposal["file"]
            image = resolve_inside(dataset, file)
            there = image is not None and image.suffix.lower() in IMAGE_EXTS
            existing = _caption(image) if there else ""
            proposals.append(
                {
                    "file": file,
                    "caption": proposal.get("caption"),
                    "existing": existing or None,
                    "problem": proposal.get("problem") if there else "the image is no longer in the dataset",
                    "url": _url("files", "datasets", row["dataset"], *file.split("/")) if there else None,
                    "thumb": _url("api", "datasets", row["dataset"], "thumb", *file.split("/")) if there else None,
                }
            )
        worked = sum(1 for p in proposals if p["caption"] is not None or p["problem"] is not None)  # not skipped
        progress = {**progress, "done": worked, "total": worked}
    return {
        **out,
        "progress": progress,
        "proposals": proposals,
        "log_tail": runs.log_tail(folder / "ui-process.log", LOG_TAIL),
    }


def _caption_routes(app: FastAPI, ui: Ui) -> None:
    runner = ui.runner

    @app.get("/api/captioning")
    def captioning_options() -> dict:
        """The caption form's choices: the captioner's default model, its modes and trigger styles."""
        return _captioner()

    @app.post("/api/datasets/{name}/caption", status_code=201)
    def caption_dataset(name: str, body: CaptionRunBody) -> dict:
        """Queue ``zimage-lora caption --dry-run`` over the dataset: proposals only, nothing written to it."""
        folder = ui.dataset(name)
        if not _images(folder):
            raise ApiError(422, f"dataset {name!r} has no images to caption; upload some first", "name")
        options, args = caption_args(ui, body)
        cap_id = uuid.uuid4().hex[:12]
        runner.queue_caption(cap_id, name, options, args)
        return {"id": cap_id, "status": ui.caption_run(cap_id)["status"]}

    @app.get("/api/datasets/{name}/captions")
    def list_caption_runs(name: str) -> dict:
        ui.dataset(name)
        return {"captions": [caption_summary(row) for row in ui.store.select("captions", "dataset = ?", name)]}

    @app.get("/api/captions/{cap_id}")
    def get_caption_run(cap_id: str) -> dict:
        return caption_detail(ui, ui.caption_run(cap_id))

    @app.post("/api/captions/{cap_id}/stop")
    def stop_caption_run(cap_id: str) -> dict:
        ui.caption_run(cap_id)
        runner.stop_caption(cap_id)
        return {"id": cap_id, "status": ui.caption_run(cap_id)["status"]}

    @app.post("/api/captions/{cap_id}/accept")
    def accept_captions(cap_id: str, body: AcceptBody) -> dict:
        """Write the accepted (perhaps edited) captions into the dataset, each as ``PUT .../captions/<file>``
        does; an image's caption that is there already is kept unless its item says ``overwrite``. Every item is
        checked before anything is written."""
        row = ui.caption_run(cap_id)
        if row["status"] != "done":
            raise ApiError(409, f"captioning run {cap_id!r} is {row['status']}; accept its proposals once it is done")
        folder = ui.dataset(row["dataset"])
        if not body.items:
            raise ApiError(422, "items: give the proposals to accept, each as {file, caption}", "items")
        accepted = []
        for index, item in enumerate(body.items):
            try:
                image = _dataset_file(folder, item.file)
            except ApiError as e:
                raise ApiError(422, f"items.{index}.file: {e.message}", f"items.{index}.file") from None
            text = item.caption.strip()
            if not text:
                field = f"items.{index}.caption"
                raise ApiError(422, f"{field}: the caption of {item.file!r} is empty; reject it instead", field)
            accepted.append((image, text, item.overwrite))
        written, kept = [], []
        for image, text, overwrite in accepted:
            file = image.relative_to(folder.resolve()).as_posix()
            existing = _caption(image)
            if existing.strip() and not overwrite:
                kept.append({"file": file, "caption": existing})
            else:
                _write_caption(image, text)
                written.append({"file": file, "caption": text})
        return {"written": written, "kept": kept}


# --- models, LoRAs, playground ----------------------------------------------------------------------------------------


def _playground_routes(app: FastAPI, ui: Ui) -> None:
    @app.get("/api/models")
    def list_models() -> dict:
        folders = sorted(p for p in (ui.data / "models").iterdir() if p.is_dir() and NAME_RE.match(p.name))
        return {"models": [{"name": p.name, "path": f"models/{p.name}"} for p in folders]}

    @app.get("/api/models/files")
    def list_model_files() -> dict:
        """The .safetensors files in DATA/models (training adapters): what a comparison of adapters offers."""
        files = sorted(p for p in (ui.data / "models").iterdir() if p.is_file() and p.suffix == ".safetensors")
        return {"files": [{"name": p.name, "path": f"models/{p.name}"} for p in files if NAME_RE.match(p.name)]}

    @app.get("/api/loras")
    def list_loras() -> dict:
        out = []
        for row in ui.store.select("jobs"):
            name, model = row["name"], row["config"]["model"]
            base_model = model["name_or_path"] or ARCHS[model["arch"]].default_model
            used_with = inference_arch(model["arch"]).name  # a LoRA trained with the training adapter runs on Turbo
            folder = ui.runner.job_dir(name)
            for checkpoint in runs.checkpoints(folder, name, _url("files", "jobs", name)):
                out.append(
                    {
                        "job": name,
                        "file": checkpoint["file"],
                        "path": f"jobs/{name}/{checkpoint['file']}",
                        "step": checkpoint["step"],
                        "final": checkpoint["final"],
                        "arch": used_with,
                        "trained_arch": model["arch"],
                        "base_model": base_model,
                        "source": "job",
                    }
                )
        uploads = (ui.data / "loras").iterdir()
        for path in sorted(p for p in uploads if p.suffix == ".safetensors" and NAME_RE.match(p.name) and p.is_file()):
            out.append(_outside_lora(path, path.name, f"loras/{path.name}", "upload", "loras"))
        for index, root in enumerate(ui.lora_dirs):
            for relative in _folder_loras(root):
                listed = f"{LORA_DIRS}/{index}/{relative}"
                out.append(_outside_lora(root / relative, relative, listed, "folder", str(root)))
        return {"loras": out}

    @app.post("/api/loras/upload")
    async def upload_loras(request: Request, model: str | None = None) -> Response:
        """LoRA files into DATA/loras, streamed to disk; each is kept only when inspect reads it as a LoRA for
        ``model`` (the playground's base model), else refused with inspect's sentence and removed."""
        await run_in_threadpool(ui.transformer, model)  # a wrong model is refused before the body is read
        received = await receive_files(request, ui.data / "loras", ui.max_lora_bytes, (".safetensors",))
        if not received:
            raise ApiError(422, "files: send the LoRA files as multipart/form-data field 'files'", "files")
        saved, rejected, first_error = [], [], None
        for item in received:
            try:
                if item.error is not None:
                    raise item.error
                saved.append(await run_in_threadpool(_keep_upload, ui, item, model))
            except ApiError as e:
                rejected.append({"file": item.raw, "error": e.message})
                first_error = first_error or e
            finally:
                if item.temp is not None:
                    item.temp.unlink(missing_ok=True)
        result = {"saved": saved, "rejected": rejected}
        if saved or first_error is None:
            return JSONResponse(result)
        return JSONResponse({"error": first_error.message, "field": "files", **result}, first_error.status)

    @app.get("/api/loras/inspect")
    def inspect_lora_file(path: str, model: str | None = None) -> dict:
        """``zimage-lora lora inspect`` of a listed LoRA for the playground's base model, with its summary line."""
        return ui.inspect(ui.lora_file(path, "path"), path, model)

    @app.post("/api/generate", status_code=202)
    def generate(request: GenerationRequest) -> dict:
        """The playground's request, its paths made the data folder's, run as ``zimage-lora generate`` would. An
        empty model is the arch's default (the registry's, as the playground's placeholder shows it); a model that
        cannot load is refused now rather than by the process seconds later; the same request while an identical
        one is queued or running answers that one (a double click generates once)."""
        arch = request.arch or (None if request.loras else DEFAULT_INFERENCE_ARCH)  # else the LoRA's, in generate
        if not request.model and arch:
            request = request.model_copy(update={"model": inference_arch(arch).default_model})
        model = request.model
        if model and model.startswith(schema.DATA_PREFIXES):
            model = str(ui.data / model)
            if not Path(model).is_dir():
                message = f"model: no folder {request.model!r} in the data folder; see GET /api/models"
                raise ApiError(422, message, "model")
        if model:
            _check_model(model)
        loras = []
        for index, lora in enumerate(request.loras):
            path = ui.lora_file(lora.path, f"loras.{index}.path")
            loras.append(lora.model_copy(update={"path": str(path)}))
        resolved = request.model_copy(update={"model": model, "loras": loras})
        args = ["generate", *resolved.cli_args(), "--no-progress"]
        gen_id = ui.runner.queue_generation(uuid.uuid4().hex[:12], request.model_dump(), args)
        return generation_summary(ui, ui.store.get("generations", gen_id))

    @app.get("/api/generate/{gen_id}")
    def get_generation(gen_id: str) -> dict:
        row = ui.store.get("generations", gen_id) if NAME_RE.match(gen_id) else None
        if row is None:
            raise ApiError(404, f"no generation {gen_id!r}", "id")
        return generation_summary(ui, row)

    @app.get("/api/generations")
    def list_generations(limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0)) -> dict:
        """The playground's past generations, newest first: its history survives a reload and a restart."""
        rows = ui.store.select("generations", order="queued DESC, created DESC")
        shown = [generation_summary(ui, row) for row in rows[offset : offset + limit]]
        return {"generations": shown, "total": len(rows)}


MODEL_OPTION = re.compile(r"model\.name_or_path|(?<![\w-])--model\b")
OFFLINE_HUB = re.compile(r"could not download (\S+) from the Hugging Face hub \((?:HF_HUB_OFFLINE is set|offline\?)")


def playground_error(message: str) -> tuple[str, str | None]:
    """(a model loader's sentence in the request's terms, the request field it is about): the loaders name the
    command line's ``--model`` (or a job file's ``model.name_or_path``), the request calls it ``model``; a hub model
    that the offline machine has not downloaded says just that."""
    offline = OFFLINE_HUB.search(message)
    if offline:
        return (
            f"model: {offline[1]} is not downloaded and this machine is offline; download it or choose a local "
            "folder under models/",
            "model",
        )
    named = MODEL_OPTION.sub("model", message)
    return (named, "model") if named != message else (message, None)


def _check_model(model: str) -> None:
    """Refuse a base model that ``generate`` would fail to load: a folder that is missing or no model, a hub id an
    offline machine (HF_HUB_OFFLINE) has not downloaded. Nothing is downloaded here: online, the process does."""
    from zimage_lora.models import hub
    from zimage_lora.models.refs import is_hub_id

    if is_hub_id(model) and not Path(model).expanduser().exists() and not hub.offline():
        return
    try:
        hub.resolve_model_dir(model, key="--model")
    except UserError as e:
        message, _ = playground_error(str(e))
        raise ApiError(422, message, "model") from None


def generation_summary(ui: Ui, row: dict[str, Any]) -> dict[str, Any]:
    """A generation as the API shows it: the request it was queued with, its state, images and error (the loader's
    sentence in the request's terms, with ``field``; the whole log at ``log``)."""
    gen_id = row["id"]
    folder = ui.runner.gen_dir(gen_id)
    images = sorted(p.name for p in folder.glob("*.png")) if row["status"] == "done" else []
    error, field = row["error"], None
    headline = error_headline(error.splitlines()) if error else None
    if headline:
        error, field = playground_error(headline)
    return {
        "id": gen_id,
        "status": row["status"],
        "request": {key: value for key, value in row["request"].items() if key != "args"},
        "created": row["created"],
        "started": row["started"],
        "finished": row["finished"],
        "images": [_url("files", "generations", gen_id, image) for image in images],
        "error": error,
        "field": field,
        "log": _url("files", "generations", gen_id, "gen.log") if (folder / "gen.log").is_file() else None,
    }


def _outside_lora(path: Path, file: str, listed: str, source: str, folder: str) -> dict[str, Any]:
    """An uploaded or --lora-dir LoRA as ``GET /api/loras`` lists it: what its metadata records, when it is ours."""
    from zimage_lora.lora.io import read_metadata

    try:
        meta = read_metadata(path)
    except UserError:  # not a safetensors file: listed all the same; inspect says what is wrong with it
        meta = {}
    trained = meta.get("zimage_lora.arch")
    trained = trained if trained in ARCHS else None
    step = meta.get("zimage_lora.step", "")
    return {
        "job": None,
        "file": file,
        "path": listed,
        "step": int(step) if re.fullmatch(r"[0-9]{1,12}", step) else None,
        "final": None,
        "arch": inference_arch(trained).name if trained else None,
        "trained_arch": trained,
        "base_model": meta.get("zimage_lora.base_model") or None,
        "source": source,
        "folder": folder,
        "bytes": path.stat().st_size,
        "url": _url("files", *listed.split("/")) + "?download=1",
    }


def _folder_loras(root: Path) -> list[str]:
    """The .safetensors files under a --lora-dir folder (subfolders too, hidden ones and links that lead out
    skipped), as paths relative to it."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.lower().endswith(".safetensors") and not file.startswith("."):
                relative = Path(folder, file).relative_to(root).as_posix()
                if resolve_inside(root, relative) is not None:
                    found.append(relative)
        if len(found) >= MAX_FOLDER_LORAS:
            break
    return found[:MAX_FOLDER_LORAS]


def _keep_upload(ui: Ui, item: Received, model: str | None) -> dict[str, Any]:
    """An uploaded LoRA, once inspect reads it for ``model``, renamed into DATA/loras (replacing a file of that
    name): ``{"file", "path", "inspect"}``; ApiError 422 with inspect's sentence (the temporary file stays for the
    caller to remove)."""
    assert item.temp is not None
    listed = f"loras/{item.name}"
    try:
        report = ui.inspect(item.temp, item.raw, model, "files")
    except ApiError as e:
        raise ApiError(e.status, e.message.replace(str(item.temp), repr(item.raw)), "files") from None
    target = ui.data / "loras" / item.name
    os.replace(item.temp, target)
    item.temp = None
    fsync_dir(target.parent)
    return {"file": item.name, "path": listed, "inspect": {**report, "file": listed}}


# --- files ------------------------------------------------------------------------------------------------------------

INLINE_TYPES = re.compile(r"^(image/(png|jpeg|webp|bmp)|text/plain|application/json)$")


def _file_routes(app: FastAPI, ui: Ui) -> None:
    @app.get("/files/{path:path}")
    def get_file(path: str, download: bool = False) -> Response:
        head = path.split("/", 1)[0]
        target = resolve_inside(ui.data, path) if head in FILE_ROOTS else None
        if head == LORA_DIRS:  # a --lora-dir file: only its LoRAs, as downloads
            try:
                target, download = ui.lora_file(path, "path"), True
            except ApiError:
                target = None
        if target is None:
            raise ApiError(404, f"no file {path!r} in the data folder", "path")
        media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        inline = not download and INLINE_TYPES.match(media_type)
        headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
        if inline:
            return FileResponse(target, media_type=media_type, headers=headers)
        return FileResponse(target, media_type=media_type, filename=target.name, headers=headers)


# --- running it -------------------------------------------------------------------------------------------------------


def serve(data: Path, host: str, port: int, token: str | None, lora_dirs: list[Path] | None = None) -> None:
    """``zimage-lora ui``: refuse to serve beyond this machine without a token, then run uvicorn."""
    import uvicorn

    from zimage_lora.errors import UserError
    from zimage_lora.ui.security import is_loopback

    if not is_loopback(host) and not token:
        raise UserError(
            f"--host {host}: serving beyond this machine needs a token; add --token T (or set ZIMAGE_LORA_UI_TOKEN)"
        )
    app = create_app(data, token, host, port, lora_dirs=lora_dirs or ())
    shown = f"[{host}]" if ":" in host else host
    print(f"zimage-lora ui: http://{shown}:{port}/ (data: {app.state.ui.data})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
