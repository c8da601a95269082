"""Files written whole or not at all: the bytes go to a hidden temporary sibling
(`.name.tmp-<pid>`), are flushed and fsynced, and the temporary file is renamed onto
the real name (atomic on POSIX). A kill leaves at most the hidden temporary file (storage
listings skip dot-files; training loops remove their leftovers), an error removes it,
and a reader never sees half a file under the real name.

Every single-file writer of the platform goes through `atomic_open`: model weights and
training checkpoints, the tokenizer, feature caches, local storage objects. (The prior's
sharded checkpoints rename a whole directory: dalle_core/distributed/checkpoint.py.)"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write; renamed onto `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_copy_file(src: str | Path, path: str | Path) -> Path:
    with open(src, "rb") as fsrc, atomic_open(path) as f:
        shutil.copyfileobj(fsrc, f)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically: a kill never leaves half a weights file or checkpoint."""
    import torch

    with atomic_open(path) as f:
        torch.save(obj, f)
    return Path(path)


def load_torch_file(path: str | Path, formats: tuple[str, ...], what: str) -> dict[str, Any]:
    """A weights file or checkpoint written with a "format" field, read back with
    weights_only (only tensors and plain containers are unpickled). A missing file raises
    FileNotFoundError; an unreadable one, or one of a format not in `formats`, ValueError
    naming the path and `what` ("dVAE", "reranker", "prior")."""
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable {what} file ({e})") from e
    found = obj.get("format") if isinstance(obj, dict) else None
    if found not in formats:
        raise ValueError(f"{path}: not a {what} file (format {found!r}; expected {' or '.join(formats)})")
    return obj


__all__ = ["atomic_copy_file", "atomic_open", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text",
           "load_torch_file"]
