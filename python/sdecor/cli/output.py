"""Where the commands write: an output folder made and proved writable before any work, and results
that a failing write at the end does not lose. Every command that writes files (train, demo, bench)
goes through :class:`OutputDir`:

* constructing it checks the path without touching the disk (:func:`check_out_dir`): a folder, or a
  path one can be made at; no file the command writes is in the way (a folder of that name, say);
* :meth:`OutputDir.prepare`, the last check before any work, makes the folder and proves it
  writable by writing and deleting a file in it. ``os.access`` cannot tell: it says yes to root, on
  read-only mounts, and to /proc. A failure is a :class:`UsageError` naming the option and the
  reason, and what prepare made is removed again;
* :meth:`OutputDir.save`, at the end, writes every file whole or not at all (a hidden temporary
  file in the same folder, then ``os.replace``): an earlier run's file is never left half
  overwritten. If a write still fails (a full disk, the folder removed meanwhile), all the files go
  into a fresh folder, ``tempfile.mkdtemp(prefix="sdecor-<command>-")``, and one line on stderr
  names it; if that fails too, the text files (the JSON of the results) are printed to stdout.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from typing import NamedTuple, Optional

from .options import UsageError


def reason(err: BaseException) -> str:
    """The reason of an OSError as the system says it (``No space left on device``)."""
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def check_out_dir(path, files=()) -> str:
    """The absolute path of an output folder that exists, or that can be made because the first
    existing path above it is a folder; each of ``files`` in it is absent or a regular file (the
    command replaces it). Touches nothing on disk; raises ValueError.

    The rest (permissions, read-only or full file systems, /proc) only a write can tell:
    :meth:`OutputDir.prepare`.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"must be a folder path; got {path!r}")
    path = os.path.abspath(os.fspath(path))
    if "\0" in path:
        raise ValueError(f"must be a folder path; got {path!r}, which holds a NUL character")
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{path} exists and is not a folder")
        for name in files:
            target = os.path.join(path, name)
            if os.path.lexists(target) and not os.path.isfile(target):
                raise ValueError(f"{target} exists and is not a regular file that can be replaced")
        return path
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot create {path}: {parent} is not a folder")
    return path


def write_file(folder: str, name: str, data: bytes) -> str:
    """Write ``data`` to folder/name whole or not at all: into a new hidden file beside it, then
    renamed over it (where folder/name is a link, over the file it points to). Returns the path.
    Raises OSError; a failed write leaves no temporary file and the old file as it was."""
    target = os.path.realpath(os.path.join(folder, name))
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:            # "x": never another file of that name; mode from the umask
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def probe_writable(folder: str) -> None:
    """Create, write and delete a file in folder; raises OSError where that cannot be done."""
    probe = os.path.join(folder, f".sdecor-write-check-{secrets.token_hex(4)}")
    try:
        with open(probe, "xb") as fh:
            fh.write(b"sdecor\n")
    except BaseException:
        try:
            os.unlink(probe)
        except OSError:
            pass
        raise
    os.unlink(probe)


class Saved(NamedTuple):
    """Where :meth:`OutputDir.save` put the files: ``folder`` (None when only printed), and whether
    it is the folder the option asked for."""

    folder: Optional[str]
    requested: bool


class OutputDir:
    """The output folder of ``sdecor <command>`` given by ``option``, for ``files``.

    ``OutputDir(path, files, command=..., option=...)`` checks the path (:func:`check_out_dir`,
    nothing touched) and raises :class:`UsageError` naming the option; :meth:`prepare` makes the
    folder and proves it writable before the work; :meth:`save` writes the results after it.
    """

    def __init__(self, path, files=(), *, command: str, option: str = "--out"):
        self.command, self.option, self.files = command, option, tuple(files)
        try:
            self.path = check_out_dir(path, self.files)
        except ValueError as err:
            raise UsageError(option, str(err)) from None
        self.made: Optional[str] = None           # the topmost folder prepare made, if any

    def prepare(self) -> str:
        """Make the folder (with its parents) and write and delete a file in it; returns its path.
        Raises :class:`UsageError` naming the option and the reason, after removing what it made."""
        made, p = None, self.path
        while not os.path.lexists(p):
            made, p = p, os.path.dirname(p)
        try:
            os.makedirs(self.path, exist_ok=True)
            check_out_dir(self.path, self.files)     # a file of a result's name may have appeared
        except (OSError, ValueError) as err:
            self._remove(made)
            raise UsageError(self.option, f"cannot create {self.path}: {reason(err)}") from None
        try:
            probe_writable(self.path)
        except OSError as err:
            self._remove(made)
            raise UsageError(self.option, f"cannot write in {self.path}: {reason(err)}") from None
        self.made = made
        return self.path

    def discard(self) -> None:
        """Remove the folders :meth:`prepare` made, where they are still empty (the command stopped
        before writing anything)."""
        self._remove(self.made)
        self.made = None

    def _remove(self, made: Optional[str]) -> None:
        if made is None:
            return
        p = self.path
        while True:
            try:
                os.rmdir(p)
            except OSError:
                return
            if p == made:
                return
            p = os.path.dirname(p)

    def save(self, files: dict, *, show=()) -> Saved:
        """Write ``files`` (name -> bytes) into the folder, each whole or not at all.

        Where a write fails, all of them go into a fresh folder from
        ``tempfile.mkdtemp(prefix="sdecor-<command>-")`` and one line on stderr says why and where
        they are; where that fails too, the files named in ``show`` (text) are printed to stdout.
        The folders :meth:`prepare` made are then removed where they are empty.
        """
        name = None
        try:
            os.makedirs(self.path, exist_ok=True)
            for name in files:
                write_file(self.path, name, files[name])
            return Saved(self.path, True)
        except OSError as err:
            failed = f"{self.option} {self.path}: cannot write " + (f"{name}: " if name else "") + reason(err)
        self.discard()                                # nothing was written there: the folders it made go
        head = f"sdecor {self.command}: error: {failed}"
        folder = None
        try:
            folder = tempfile.mkdtemp(prefix=f"sdecor-{self.command}-")
            for name in files:
                write_file(folder, name, files[name])
        except OSError as err:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            printed = [n for n in show if n in files]
            print(f"{head}; nor into a temporary folder ({reason(err)})"
                  + (f": {', '.join(printed)} follow{'s' if len(printed) == 1 else ''} on stdout" if printed
                     else ": the results are lost"), file=sys.stderr, flush=True)
            for n in printed:
                text = files[n].decode("utf-8", errors="replace")
                sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
            return Saved(None, False)
        print(f"{head}; the results are in {folder} instead ({', '.join(files)})", file=sys.stderr, flush=True)
        return Saved(folder, False)
