"""The training corpus of the built-in tiny models: English prose that ships with CPython.

Two sources, read in a fixed order so every run sees the same documents:

* ``pydoc_data.topics.topics`` — the Python reference/library doc sections that ``help()``
  shows (one document per topic, sorted by key);
* the docstrings of the standard library (module, class and function docstrings found with
  ``ast`` in the stdlib ``.py`` files, sorted by path; tests, demos and generated codecs are
  left out, exact duplicates kept once).

The held-out split is by *group* (a topic key, or a stdlib file): a group goes to the held-out
set when ``crc32(group) % HELD_OUT_MODULUS == 0``, so the split is deterministic and never
cuts one module's docstrings across both sides.

A quarter of the function/class docstrings (again chosen by crc32) are written as a chat turn
("What does `json.dumps` do?" → docstring) so the model also learns the chat template and to
close its answer with ``<|im_end|>``.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_MODULUS = 20  # about 1 group in 20 is held out

# Directories under the stdlib whose docstrings are not prose we want (tests, demos, tools,
# generated codec tables), or that are not the stdlib at all (site-packages).
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "lib2to3",
        "ensurepip",
        "turtledemo",
        "encodings",
        "pydoc_data",
        "__phello__",
        "Tools",
    }
)
_MIN_DOCSTRING_CHARS = 40


@dataclass(frozen=True, slots=True)
class Document:
    """One training document. ``group`` decides the split; ``question`` makes it a chat turn."""

    group: str
    text: str
    question: str | None = None

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.group.encode()) % HELD_OUT_MODULUS == 0


def topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield Document(group=f"topic:{key}", text=text)


def stdlib_files(stdlib: Path | None = None) -> list[Path]:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not set(parts[:-1]) & _SKIP_DIRS and not parts[0].startswith("config-"):
            files.append(path)
    return files


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def docstring_documents(stdlib: Path | None = None) -> Iterator[Document]:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in stdlib_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = _module_name(root, path)
        group = f"stdlib:{module}"
        for node, qualname in _walk_named(tree, module):
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < _MIN_DOCSTRING_CHARS or doc in seen:
                continue
            seen.add(doc)
            question = None
            if not isinstance(node, ast.Module) and zlib.crc32(qualname.encode()) % 4 == 1:
                question = f"What does `{qualname}` do?"
            yield Document(group=group, text=doc.strip(), question=question)


def _walk_named(node: ast.AST, qualname: str) -> Iterator[tuple[ast.AST, str]]:
    """Module, classes and functions in source order, each with its dotted name."""
    yield node, qualname
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk_named(child, f"{qualname}.{child.name}")


def all_documents() -> list[Document]:
    return [*topic_documents(), *docstring_documents()]


def split_documents(docs: list[Document] | None = None) -> tuple[list[Document], list[Document]]:
    """(train, held_out), both in corpus order."""
    docs = all_documents() if docs is None else docs
    return [d for d in docs if not d.held_out], [d for d in docs if d.held_out]


def held_out_documents() -> list[Document]:
    return split_documents()[1]
