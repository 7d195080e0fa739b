"""Model references: the one rule for telling a hub id from a path on disk (no network, no heavy imports).

A reference is either something on disk or a hub id, never both. Hub ids are ``org/name`` with an optional
``@revision``; hub files are ``org/name[@revision]/path/in/repo`` (``@revision`` may also follow the file). The job
config (``config.py``) and the downloader (``models/hub.py``) both decide with these functions.
"""

from __future__ import annotations

import re
from pathlib import Path

from zimage_lora.errors import UserError

# Hugging Face repo names: letters, digits, '-', '_', '.'; at most 96 characters per part.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into ``("org/name", "revision")``; no ``@`` gives ``("org/name", None)``."""
    ref = ref.strip()
    if "@" not in ref:
        return ref, None
    repo_id, revision = ref.rsplit("@", 1)
    if not revision or not _REVISION.fullmatch(revision):
        raise UserError(f"'{ref}' has an empty or malformed revision after '@': write org/name@branch-tag-or-commit.")
    return repo_id, revision


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` has the shape ``org/name`` or ``org/name@revision`` (says nothing about the hub)."""
    try:
        repo_id, _ = parse_ref(ref)
    except UserError:
        return False
    return bool(_REPO_ID.fullmatch(repo_id)) and "--" not in repo_id and ".." not in repo_id


def split_file_ref(ref: str) -> tuple[str | None, str | None, str]:
    """Split a hub file path; ``(None, None, ref)`` when it does not have the shape ``org/repo/file``."""
    parts = ref.strip().split("/")
    if len(parts) < 3 or any(not part for part in parts):
        return None, None, ref
    org, repo, rest = parts[0], parts[1], "/".join(parts[2:])
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    elif "@" in parts[-1]:
        rest, revision = rest.rsplit("@", 1)
    repo_id = f"{org}/{repo}"
    if not is_hub_id(repo_id) or (revision is not None and not _REVISION.fullmatch(revision)) or "@" in rest:
        return None, None, ref
    return repo_id, revision, rest


def looks_local(ref: str, *, max_slashes: int | None) -> bool:
    """Whether ``ref`` is clearly meant as a path on disk rather than a hub id."""
    ref = ref.strip()
    if ref.startswith(("/", "./", "../", "~", ".\\", "..\\")) or ref in (".", "..") or "\\" in ref:
        return True
    if re.match(r"^[A-Za-z]:[\\/]", ref):  # a Windows drive
        return True
    return max_slashes is not None and ref.split("@", 1)[0].count("/") > max_slashes


def is_hub_ref(ref: str) -> bool:
    """A hub repo id or a hub file reference (says nothing about whether it exists on the hub)."""
    return is_hub_id(ref) or split_file_ref(ref)[0] is not None


def portable_ref(ref: str | None) -> str:
    """A hub id as given; a local path by its name only (what a LoRA records as its base model: the same file
    trained elsewhere gives the same bytes)."""
    if not ref:
        return ""
    path = Path(ref).expanduser()
    return path.name if path.exists() else ref


TOY_MARKER = "toy_world.json"  # in each of the toy world's model folders (docs/toyworld.md)


def is_toy_world(model: str | None) -> bool:
    """Whether ``model`` is a folder of the toy world, whose pictures can be scored (toyworld/score.py)."""
    return bool(model) and (Path(model) / TOY_MARKER).is_file()
