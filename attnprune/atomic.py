"""Outputs written only on success: to a temporary name next to the target, then renamed into place, so a failed
run leaves no partial results, tables or plots behind. Output paths are checked before the work that fills them, and
file names made from user data (a routing's name) stay inside their output folder."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from attnprune.errors import UserError

__all__ = [
    "atomic_path",
    "check_distinct_outputs",
    "check_output_dir",
    "check_output_file",
    "safe_file_names",
    "staged_dir",
    "staged_files",
    "write_text_atomic",
]

_UNSAFE = re.compile(r"[^\w.=+,-]")
MAX_NAME_CHARS = 100  # well below the 255 bytes a file name may have, with room for a prefix and suffix


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside ``path`` for any writer to write to (``savefig``, ``torch.save``, safetensors'
    ``save_file``); renamed to ``path`` when the block succeeds, removed when it fails. The name ends in ``path``'s
    suffix, so a writer that reads the format from it (matplotlib) writes the right one; folders are created.

    Example:
        >>> import json, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "result.json") as tmp:
        ...     _ = tmp.write_text(json.dumps({"top1": 0.9}))
        >>> [p.name for p in folder.iterdir()]
        ['result.json']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_files() -> Iterator[Callable[[str | Path], Path]]:
    """Several files, in any folders, that appear together once the block succeeds: ``stage(path)`` gives the
    temporary name (:func:`atomic_path`) to write ``path`` to; at the end of the block every one is renamed into
    place, and when the block fails none is.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with staged_files() as stage:
        ...     _ = stage(folder / "a" / "routing.yaml").write_text("rules: []")
        ...     _ = stage(folder / "b" / "report.json").write_text("{}")
        ...     (folder / "a" / "routing.yaml").exists()  # nothing in place yet
        False
        >>> sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        ['a/routing.yaml', 'b/report.json']
    """
    with ExitStack() as stack:
        yield lambda path: stack.enter_context(atomic_path(path))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def staged_dir(output_dir: str | Path) -> Iterator[Path]:
    """A temporary folder next to ``output_dir`` to write into; when the block succeeds each file in it is renamed
    into ``output_dir`` (created if needed, other files there left alone), when it fails the folder is removed."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.", suffix=".tmp"))
    try:
        yield stage
        output_dir.mkdir(parents=True, exist_ok=True)
        for item in sorted(stage.rglob("*")):
            if item.is_file():
                target = output_dir / item.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def safe_file_names(names: Iterable[str]) -> list[str]:
    """``names`` (routing names, from user data) as file names that stay inside the folder they are joined to.

    Every character but letters, digits and ``. = + , -`` becomes ``_`` (so no ``/`` or ``\\``), as does a leading
    dot (so no ``..`` and no hidden file); a name is cut to :data:`MAX_NAME_CHARS` and an empty one becomes ``_``.
    A name already taken by an earlier one gets ``-2``, ``-3``, ... so no output overwrites another.

    Examples:
        >>> safe_file_names(["tome-r2", "x/../../evil", "/etc/passwd", "..", "tome-r2"])
        ['tome-r2', 'x_.._.._evil', '_etc_passwd', '_.', 'tome-r2-2']
    """
    taken: set[str] = set()
    out = []
    for name in names:
        safe = _UNSAFE.sub("_", name)[:MAX_NAME_CHARS] or "_"
        safe = "_" + safe[1:] if safe.startswith(".") else safe
        unique, n = safe, 2
        while unique in taken:
            unique, n = f"{safe}-{n}", n + 1
        taken.add(unique)
        out.append(unique)
    return out


def check_output_file(path: str | Path, option: str) -> Path:
    """Check, before any work, that a file can be written at ``path`` (given as ``option``), as
    :func:`write_text_atomic` writes it: not a directory, and the nearest folder on its way that exists is a folder
    this process may write in (the missing ones are created).

    Raises:
        UserError: naming the option, the path and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; expected a file name")
    _check_writable_parent(path, option)
    return path


def check_output_dir(path: str | Path, option: str) -> Path:
    """Check, before any work, that files can be written into the folder ``path`` (given as ``option``), as
    :func:`staged_dir` writes them: not a file, and the nearest folder on its way that exists (``path`` itself, or
    the folder its missing parents will be made in) is a folder this process may write in.

    Raises:
        UserError: naming the option, the path and what is wrong.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; expected a folder")
    _check_writable_parent(path, option)
    return path


def _check_writable_parent(path: Path, option: str) -> None:
    """The nearest existing folder above ``path`` is a folder this process may write in (``staged_dir`` and
    ``write_text_atomic`` write beside their target, in its parent)."""
    folder = path.absolute().parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path} cannot be written: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} cannot be written: the folder {folder} is not writable")


def check_distinct_outputs(outputs: dict[str, str | Path | None]) -> None:
    """Refuse two outputs of one command that are the same file (``outputs`` maps how each is given, say
    ``--state_path``, to its path; None is no output), before any work: the second would overwrite the first.

    Raises:
        UserError: naming both outputs and the path.
    """
    seen: dict[Path, str] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UserError(f"{seen[resolved]} and {label} are the same file {path}; give each its own path")
        seen[resolved] = label
