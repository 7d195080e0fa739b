"""Rules of the code's design that a review would otherwise have to check by hand.

- The architecture registry (``models/arch.py``) is the only place that names an arch: no registry key appears as a
  whole word in a string constant of ``src/`` (f-strings and docstrings included) outside the registry and the
  presets, nor anywhere in the web UI's static files.
- Nothing outside ``training/`` imports or patches a private helper of the training recipe.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from zimage_lora.models.arch import ARCHS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "zimage_lora"
ARCH_WORD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, ARCHS), key=len, reverse=True)) + r")\b")


def _string_constants(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def arch_names_outside_the_registry() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "models" / "arch.py":
            continue
        for line, text in _string_constants(ast.parse(path.read_text(encoding="utf-8"))):
            for match in ARCH_WORD.finditer(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {match[0]}")
    for path in sorted((SRC / "ui" / "static").iterdir()):
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in ARCH_WORD.finditer(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {match[0]}")
    return found


def test_no_arch_is_named_outside_the_registry_and_the_presets():
    assert arch_names_outside_the_registry() == []


def test_the_arch_name_search_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The check above is not vacuous: an f-string, a docstring and a JS line that name an arch are all found."""
    fake = tmp_path / "zimage_lora"
    (fake / "models").mkdir(parents=True)
    (fake / "ui" / "static").mkdir(parents=True)
    arch = next(iter(ARCHS))
    (fake / "a.py").write_text(f'"""Docs about {arch}."""\nx = f"{{1}} {arch}, no"\ny = "{arch}_not_a_key"\n')
    (fake / "ui" / "static" / "b.js").write_text(f"const a = '{arch}';\n")
    monkeypatch.setattr("test_design.SRC", fake)
    monkeypatch.setattr("test_design.ROOT", tmp_path)
    found = arch_names_outside_the_registry()
    assert found == [
        f"zimage_lora/a.py:1: {arch}",
        f"zimage_lora/a.py:2: {arch}",
        f"zimage_lora/ui/static/b.js:1: {arch}",
    ]


def test_no_private_helper_of_the_recipe_is_used_outside_training():
    private = []
    for folder in (SRC, ROOT / "tests", ROOT / "benchmarks"):
        for path in sorted(folder.rglob("*.py")):
            if path.is_relative_to(SRC / "training"):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zimage_lora.training"):
                    private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    if isinstance(node.value, ast.Name) and node.value.id in ("recipe", "LoraRecipe"):
                        private.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert private == []
