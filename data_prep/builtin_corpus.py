"""The built-in offline corpus: the running Python's own documentation and standard-library source.

It exists on every machine with Python, so a first training run needs no download. Documents, in a
fixed order:

1. the documentation topics shipped with ``pydoc`` (``pydoc_data.topics``: the language reference
   and library docs that ``help()`` shows), one document per topic, id ``pydoc/<topic>``;
2. every ``.py`` file of the standard library, except test suites and third-party ``site-packages``,
   id ``stdlib/<relative path>`` (about 12 MB on CPython 3.11).

The content depends on the Python version; ``fingerprint()`` says which one was used.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

# Folders of the standard library that are not part of the corpus.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    """The folder holding the standard library's ``.py`` files."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_files() -> list[tuple[str, Path]]:
    """``(doc_id, path)`` of every standard-library source file in the corpus, sorted by id."""
    root = stdlib_root()
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]  # prune: never walk site-packages
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                files.append((f"stdlib/{path.relative_to(root).as_posix()}", path))
    return sorted(files)


def pydoc_topics() -> list[tuple[str, str]]:
    """``(doc_id, text)`` of every ``pydoc`` documentation topic, sorted by id (empty if not shipped)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return sorted((f"pydoc/{name}", text) for name, text in topics.items() if text.strip())


def iter_documents() -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for every document of the corpus (source files that are not UTF-8 are skipped)."""
    yield from pydoc_topics()
    for doc_id, path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield doc_id, text


def fingerprint() -> dict[str, object]:
    """What identifies this machine's corpus: Python version, file count and total size."""
    files = stdlib_files()
    return {
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "stdlib_files": len(files),
        "stdlib_bytes": sum(p.stat().st_size for _, p in files),
        "pydoc_topics": len(pydoc_topics()),
    }
