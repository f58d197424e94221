"""Safe writes: a reader sees the old output or the complete new one, never a half-written one;
an output never replaces an input or a directory we did not write; nothing is left behind.

Every directory we write carries ``nsn_output.json`` (what wrote it, and what kind of output it
is); ``--overwrite`` replaces only such a directory. Work happens in a hidden sibling
``.NAME.nsn-tmp-PID-*`` that is removed on any error, on ``SIGINT`` and on ``SIGTERM``; one left by
a run that was killed outright (``SIGKILL``, power loss) is recognised by its dead PID and removed
by the next run on the same output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

OUTPUT_MARKER = "nsn_output.json"
SCRATCH_TAG = "nsn-tmp"


class OutputError(ValueError):
    """An output location that would destroy an input or a directory nsn-export did not write."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_permissions(root: Path) -> None:
    """Temp files are private (0600/0700); give the finished output the permissions the user's
    umask gives any new file."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for entry in root.rglob("*"):
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


def is_our_output(path: Path) -> bool:
    """True for a real directory (not a symlink) that holds our marker file."""
    return path.is_dir() and not path.is_symlink() and (path / OUTPUT_MARKER).is_file()


def is_empty_directory(path: Path) -> bool:
    """True for a real directory (not a symlink) with nothing in it: it holds nothing to lose."""
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                 overwrite: bool = False) -> None:
    """Refuse ``path`` as an output when it is, contains or lies inside one of ``inputs``; when it
    exists without ``overwrite``; or when it exists but is not a directory nsn-export wrote.
    An empty directory (``tempfile.TemporaryDirectory()``) is accepted, with or without
    ``overwrite``."""
    path = Path(path)
    refuse_overlap(path, inputs, "--output")
    if not (path.exists() or path.is_symlink()) or is_empty_directory(path):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if not is_our_output(path):
        raise OutputError(f"{path} exists and was not written by nsn-export (no {OUTPUT_MARKER} in it), so "
                          f"--overwrite will not replace it; choose another --output or remove it yourself")


def overlap(path: Path, other: Path) -> str | None:
    """How ``path`` relates to ``other`` ("is", "is inside", "contains"), or None when apart."""
    target, resolved = path.resolve(), other.resolve()
    if target == resolved:
        return "is"
    if target.is_relative_to(resolved):
        return "is inside"
    if resolved.is_relative_to(target):
        return "contains"
    return None


def refuse_overlap(path: Path, inputs: Iterable[str | os.PathLike | None], option: str) -> None:
    for source in inputs:
        if source is not None and (relation := overlap(path, Path(source))):
            raise OutputError(f"{option} {path} {relation} the input {source}; writing it would destroy the input: "
                              f"choose an {option} outside it")


def check_output_files(outputs: dict[str, str | os.PathLike | None],
                       inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """The one check of the files a command will write (reports, plots, logs, rank files,
    frontiers), run before any work: ``outputs`` maps each option (``"--plot"``) to its path (None:
    not asked for). Each may replace an existing regular file, but may not be, contain or lie
    inside an input, be a directory or a special file, or be the same path as another output."""
    inputs = list(inputs)
    given = {option: Path(path) for option, path in outputs.items() if path is not None}
    for option, path in given.items():
        refuse_overlap(path, inputs, option)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a symlink" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
            raise OutputError(f"{option} {path} is {kind}; give the path of a file to write")
    seen: dict[Path, str] = {}
    for option, path in given.items():
        key = path.resolve()
        if key in seen:
            raise OutputError(f"{option} {path} is the same file as {seen[key]}; give each output its own path")
        seen[key] = option


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_scratch(path: Path) -> list[Path]:
    """Remove scratch directories next to ``path`` left by runs that no longer exist (returns them).
    A run killed between moving the old output aside and moving the new one in left the old
    output in its scratch directory: that one is put back first."""
    removed = []
    head = f".{path.name}.{SCRATCH_TAG}-"
    for entry in path.parent.glob(glob.escape(head) + "*"):
        kind, _, rest = entry.name[len(head):].partition("-")
        pid_text = rest.split("-")[0]
        if not entry.is_dir() or entry.is_symlink() or not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        if kind == "old" and (entry / path.name).is_dir() and not path.exists():
            os.replace(entry / path.name, path)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def scratch_dir(path: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{SCRATCH_TAG}-{kind}-{os.getpid()}-", dir=path.parent))


@contextlib.contextmanager
def exit_on_termination():
    """Turn ``SIGTERM`` (and ``SIGHUP``) into ``SystemExit`` while the block runs, so ``finally``
    clauses clean up; ``SIGINT`` already raises ``KeyboardInterrupt``. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def atomic_directory(path: str | os.PathLike, fill: Callable[[Path], None], kind: str = "output",
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Write a directory through ``fill(tmp_dir)`` into a hidden sibling, then swap it into place.

    ``path`` may already exist only as an nsn-export output (it is then replaced; the old one is
    deleted only after the new one is complete) and may not overlap ``inputs``."""
    path = Path(path)
    check_output(path, inputs, overwrite=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(path)
    tmp, old = None, None
    try:
        with exit_on_termination():
            tmp = scratch_dir(path, "new")
            fill(tmp)
            marker = {"written_by": "nsn-export", "kind": kind}
            (tmp / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            apply_default_permissions(tmp)
            if path.exists():
                old = scratch_dir(path, "old")
                os.replace(path, old / path.name)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old / path.name, path)
                    raise
            else:
                os.replace(tmp, path)
    finally:
        for scratch in (tmp, old):  # tmp is gone after a successful swap
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    return path


def atomic_file(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write ``text`` (or bytes) to ``path`` through a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with exit_on_termination(), os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
