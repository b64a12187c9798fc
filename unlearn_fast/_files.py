"""Write aside, then rename: a crash never leaves a half-written file or directory where a reader looks."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_directory(path: Path, files: bool = True) -> None:
    """Flush the directory's files (when asked) and the directory entry itself."""
    for f in path.iterdir() if files else ():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_directory(directory, *, durable: bool = False):
    """Yield a fresh temporary directory beside ``directory``; on success it replaces ``directory``
    (whatever was there is removed); on an exception the temporary directory is removed instead.
    ``durable``: flush the files before the rename and the parent's entry after (checkpoints)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        fsync_directory(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    if durable:
        fsync_directory(directory.parent, files=False)


@contextlib.contextmanager
def replace_file(path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
