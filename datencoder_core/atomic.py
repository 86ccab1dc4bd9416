"""Files written whole or not at all: each is written to a hidden temporary sibling, then moved onto its
path with one ``os.replace``, so a crash or an error never leaves a half-written file under the real name."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_sibling(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """``.<name>.<pid>.<kind><suffix>`` beside ``path``: hidden, one per process, and with ``path``'s suffix so
    that writers that choose the format by it (matplotlib, PIL, torchvision) write the right one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}{path.suffix}")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path to write ``path``'s new content to. Leaving the block normally moves it onto ``path``;
    leaving it with an exception removes it and leaves ``path`` as it was."""
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
