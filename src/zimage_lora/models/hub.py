"""Turning a model reference (a local folder, a file, or a Hugging Face hub id) into a path on disk.

A reference is either something on disk or a hub id, never both: an existing path wins, a path that looks local
(absolute, ``./``, ``~``, more than one ``/`` for a folder) and is missing is an error, and anything else must be
``org/name`` with an optional ``@revision``. Every hub failure (offline, unreachable, unknown or gated repo, missing
revision or file) becomes one ``UserError`` sentence that says how to get the files onto this machine, so that
the CLI never prints a traceback for a machine without network.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from zimage_lora.errors import UserError
from zimage_lora.models.refs import is_hub_id, looks_local, parse_ref, split_file_ref

# The subfolders of a diffusers-layout Z-Image folder.
COMPONENT_SUBFOLDERS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def resolve_model_dir(
    ref: str,
    allow_patterns: Sequence[str] | None = None,
    *,
    subfolders: Iterable[str] = (),
    key: str = "model.name_or_path",
) -> Path:
    """Return the folder for a local diffusers-layout folder or a hub repo id (downloaded into the hub cache).

    ``subfolders`` are the components the caller needs; a local folder is accepted when it holds
    ``model_index.json`` or one of them (any component subfolder when none is given), and the caller checks each
    one it loads. ``allow_patterns`` limits a download to the files needed (e.g. ``["transformer/*"]``). ``key``
    names the config key in error messages.
    """
    subfolders = tuple(subfolders) or COMPONENT_SUBFOLDERS
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not any((path / sub).is_dir() for sub in subfolders):
            wanted = ", ".join(f"{sub}/" for sub in subfolders)
            raise UserError(
                f"{key} folder {path} is not a diffusers-layout Z-Image folder: it has no model_index.json and none of "
                f"{wanted}; point {key} at the folder that holds them."
            )
        return path
    if path.exists():
        raise UserError(f"{key} {path} is a file, not a folder: point {key} at a diffusers-layout model folder.")
    if looks_local(ref, max_slashes=1):
        raise UserError(f"{key} folder {path} does not exist: fix the path, or give a hub id like org/name.")
    if not is_hub_id(ref):
        raise UserError(
            f"{key} '{ref}' is not a folder and not a hub id: give an existing folder or org/name[@revision]."
        )
    repo_id, revision = parse_ref(ref)
    patterns = list(allow_patterns) if allow_patterns is not None else None
    with _hub_errors(ref, key=key, cli_args=_cli_args(repo_id, revision)):
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            token=os.environ.get("HF_TOKEN"),
            allow_patterns=patterns,
            local_files_only=offline(),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    return Path(folder)


def resolve_file(ref: str, *, key: str = "file") -> Path:
    """Return a local file, or download ``org/repo[@rev]/path/in/repo[@rev]`` with ``hf_hub_download``."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"{key} {path} is a folder, not a file: point {key} at the .safetensors file inside it.")
    repo_id, revision, filename = split_file_ref(ref)
    if looks_local(ref, max_slashes=None) or repo_id is None:
        raise UserError(
            f"{key} {ref} is not an existing file and not a hub path: give a file on disk or org/repo[@rev]/file."
        )
    with _hub_errors(ref, key=key, cli_args=_cli_args(repo_id, revision, filename), filename=filename):
        downloaded = huggingface_hub.hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            token=os.environ.get("HF_TOKEN"),
            local_files_only=offline(),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    return Path(downloaded)


def _cli_args(repo_id: str, revision: str | None, filename: str | None = None) -> str:
    """The arguments of the ``hf download`` command that fetches the same files on another machine."""
    args = [repo_id] + ([filename] if filename else []) + (["--revision", revision] if revision else [])
    return " ".join([*args, "--local-dir", repo_id.split("/")[1]])


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return hub_constants.HF_HUB_OFFLINE or flag in {"1", "ON", "YES", "TRUE"}


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of whichever HTTP client this huggingface_hub version uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@contextmanager
def _hub_errors(ref: str, *, key: str, cli_args: str, filename: str | None = None) -> Iterator[None]:
    """Turn a huggingface_hub failure inside the block into one ``UserError`` sentence; re-raise anything else."""
    try:
        yield
    except Exception as exc:
        message = _hub_message(exc, ref, key=key, cli_args=cli_args, filename=filename)
        if message is None:
            raise
        raise UserError(message) from exc


def _hub_message(exc: BaseException, ref: str, *, key: str, cli_args: str, filename: str | None) -> str | None:
    download = (
        f"download it on a connected machine with `hf download {cli_args}`, copy that folder here and set {key} "
        "to the local path"
    )
    if isinstance(exc, hub_errors.GatedRepoError):
        return (
            f"{ref} is a gated repo on the Hugging Face hub: accept its terms on the repo page and set HF_TOKEN to a "
            f"token of that account, or {download}."
        )
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return f"{ref}: that revision does not exist on the Hugging Face hub; fix the part after '@' in {key}."
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return (
            f"{ref} was not found on the Hugging Face hub (misspelled, private or gated?): check {key}, or set "
            "HF_TOKEN to a token that can read it."
        )
    if filename is not None and isinstance(exc, hub_errors.RemoteEntryNotFoundError):
        return f"{ref}: the repo has no file {filename} on the Hugging Face hub; check the path in {key}."
    if isinstance(exc, hub_errors.HFValidationError):
        return f"{key} '{ref}' is not a valid hub id: give an existing folder or org/name[@revision]."
    cause = exc.__cause__ or exc.__context__
    if (
        isinstance(exc, hub_errors.OfflineModeIsEnabled)
        or isinstance(cause, hub_errors.OfflineModeIsEnabled)
        or (isinstance(exc, hub_errors.LocalEntryNotFoundError) and offline())
    ):
        return (
            f"could not download {ref} from the Hugging Face hub (HF_HUB_OFFLINE is set and it is not in the local "
            f"cache): {download}, or unset HF_HUB_OFFLINE."
        )
    if isinstance(exc, (hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError, *_transport_errors())):
        return (
            f"could not download {ref} from the Hugging Face hub (offline?): {download}, or set HF_TOKEN for "
            "gated repos."
        )
    return None
