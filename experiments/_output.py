"""The output directory of a ``compare`` / ``sweep`` / ``run`` (``--out``): checked before any
training, locked while a run uses it, written atomically.

- :func:`check_out_dir` fails early (before training) when ``--out`` is a file, lies under a
  file, or already holds results (``results.json`` / ``results.md``) and ``overwrite`` is not
  given.
- :func:`locked` takes the directory's lock: a file :data:`LOCK_NAME` created with
  ``O_CREAT | O_EXCL`` holding ``"<pid> <host>"``, removed on exit. A lock left by a process
  that no longer exists (same host) is taken over; a live one is an :class:`OutputError`, so
  two concurrent runs cannot write into the same directory.
- :func:`atomic_write` / :func:`atomic_save` write a temporary file in the directory and
  ``os.replace`` it over the target: a reader (or a crash) sees the old file or the new one,
  never a partial one.
- :class:`OutputDir` bundles the three for the command line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "LOCK_NAME",
    "OUTPUT_FILES",
    "RESULT_FILES",
    "OutputDir",
    "OutputError",
    "atomic_save",
    "atomic_save_many",
    "atomic_write",
    "check_out_dir",
    "locked",
]

LOCK_NAME = ".experiments.lock"
"""The lock file inside an output directory while a run writes there."""

RESULT_FILES: tuple[str, ...] = ("results.json", "results.md")
"""Files whose presence means "this directory holds the results of a run"."""

OUTPUT_FILES: tuple[str, ...] = RESULT_FILES + (
    "metrics.png",
    "weights.png",
    "curves.png",
    "trajectories.png",
    "sweep_metrics.png",
    "sweep_front.png",
)
"""Every file the commands write (stale ones are removed when a run overwrites a directory)."""


class OutputError(Exception):
    """The output directory cannot be used (a usage error on the command line)."""


def check_out_dir(path: Path, *, overwrite: bool, option: str = "--out") -> None:
    """Fail before any work when ``path`` cannot receive results.

    Raises:
        OutputError: ``path`` is an existing file, lies under one, or holds results (see
            :data:`RESULT_FILES`) and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: is an existing file, not a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option} {path}: {parent} is a file, not a directory")
            break
    if not overwrite:
        held = [name for name in RESULT_FILES if (path / name).exists()]
        if held:
            raise OutputError(
                f"{option} {path} already holds the results of a run ({', '.join(held)}); "
                f"pass --overwrite to replace them, or choose another {option}"
            )


# ---------------------------------------------------------------------------- lock
def _read_lock(lock: Path) -> tuple[int | None, str]:
    try:
        text = lock.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None, ""
    parts = text.split()
    try:
        pid = int(parts[0]) if parts else None
    except ValueError:
        pid = None
    return pid, parts[1] if len(parts) > 1 else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError as e:  # pragma: no cover - e.g. EINVAL
        return e.errno != errno.ESRCH
    return True


_FRESH_S = 10.0
"""An empty lock file younger than this is a process between creating it and writing its pid."""


def _holder(pid: int | None, host: str, lock: Path | None = None) -> str | None:
    """Why the lock is held (``None``: it is stale and may be taken over)."""
    if pid is None:  # empty or garbled: being written, or its writer died before writing
        try:
            age = time.time() - lock.stat().st_mtime if lock is not None else _FRESH_S
        except FileNotFoundError:
            return None
        return "a process that is starting" if age < _FRESH_S else None
    if host and host != socket.gethostname():
        return f"process {pid} on host {host} (cannot check it from here)"
    if pid == os.getpid() or _alive(pid):
        return f"process {pid}"
    return None


def _create(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


def _acquire(directory: Path) -> Path:
    lock = directory / LOCK_NAME
    for _ in range(5):
        if _create(lock):
            return lock
        pid, host = _read_lock(lock)
        why = _holder(pid, host, lock)
        if why is not None:
            raise OutputError(
                f"{directory} is in use by {why} (lock file {lock}); wait for that run to "
                f"finish or choose another --out; delete the lock file only if no run is "
                f"using the directory"
            )
        # stale: move it aside (atomic: of two processes taking it over, one wins the rename)
        grave = directory / f"{LOCK_NAME}.stale.{os.getpid()}"
        try:
            os.replace(lock, grave)
        except FileNotFoundError:
            continue  # someone else moved it; try to create ours again
        moved_pid, moved_host = _read_lock(grave)
        if (moved_pid, moved_host) != (pid, host) and _holder(moved_pid, moved_host):
            # we moved a fresh lock that another process had just created: put it back
            with contextlib.suppress(FileExistsError):
                os.link(grave, lock)
            grave.unlink(missing_ok=True)
            raise OutputError(f"{directory} is in use by process {moved_pid} (lock file {lock})")
        grave.unlink(missing_ok=True)
    raise OutputError(f"could not take the lock {lock} (contended); try again")  # pragma: no cover


def _release(lock: Path) -> None:
    pid, host = _read_lock(lock)
    if pid == os.getpid() and host == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[Path]:
    """Hold the lock of ``directory`` (which must exist) for the ``with`` block.

    Raises:
        OutputError: another live process holds it, or the directory is not writable.
    """
    directory = Path(directory)
    try:
        lock = _acquire(directory)
    except OutputError:
        raise
    except OSError as e:  # read-only, no permission, ...
        raise OutputError(f"{directory}: cannot create the lock file there ({e})") from None
    try:
        yield lock
    finally:
        _release(lock)


# ---------------------------------------------------------------------------- atomic writes
def atomic_save(path: Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp)`` on a temporary path next to ``path`` (same suffix, so that e.g.
    matplotlib picks the format), then ``os.replace`` it over ``path``.

    The temporary file is removed when ``writer`` fails; ``path`` is then untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save_many(paths: Sequence[Path], writer: Callable[[list[Path]], object]) -> None:
    """:func:`atomic_save` for a writer that produces several files in one call: each is
    renamed into place once all of them are written."""
    final = [Path(p) for p in paths]
    tmps = [p.with_name(f".{p.stem}.tmp-{os.getpid()}{p.suffix}") for p in final]
    try:
        writer(tmps)
        for tmp, path in zip(tmps, final):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_save`)."""
    return atomic_save(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------- together
class OutputDir:
    """``with OutputDir(path, overwrite=...) as out:`` checks ``path`` (:func:`check_out_dir`),
    creates it, takes its lock and re-checks under the lock (a run that finished meanwhile);
    :meth:`write` / :meth:`save` write atomically; :meth:`finish` removes the files of an
    overwritten run that this one did not write. On exit the lock is released, and a
    directory this object created is removed again if it is still empty (nothing was
    written)."""

    def __init__(self, path: Path, *, overwrite: bool) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._created = False
        self._lock: contextlib.AbstractContextManager[Path] | None = None

    def __enter__(self) -> OutputDir:
        check_out_dir(self.path, overwrite=self.overwrite)
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--out {self.path}: cannot create it ({e.strerror})") from None
        self._lock = locked(self.path)
        try:
            self._lock.__enter__()
            check_out_dir(self.path, overwrite=self.overwrite)
        except BaseException:
            if self._lock is not None:
                self._lock.__exit__(None, None, None)
                self._lock = None
            self._remove_if_empty()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lock is not None:
            self._lock.__exit__(exc_type, exc, tb)
            self._lock = None
        self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only succeeds when empty

    def file(self, name: str) -> Path:
        """The path of output ``name``."""
        return self.path / name

    def write(self, name: str, text: str) -> Path:
        """Write text output ``name`` atomically."""
        return atomic_write(self.file(name), text)

    def save(self, name: str, writer: Callable[[Path], object]) -> Path:
        """Produce output ``name`` with ``writer(tmp_path)`` atomically (e.g. a figure)."""
        return atomic_save(self.file(name), writer)

    def save_many(self, names: Sequence[str], writer: Callable[[list[Path]], object]) -> None:
        """Produce several outputs with one ``writer(tmp_paths)`` call, atomically each."""
        atomic_save_many([self.file(n) for n in names], writer)

    def finish(self, written: Sequence[str]) -> None:
        """With ``overwrite``: remove the outputs of the previous run (:data:`OUTPUT_FILES`)
        that this one did not write, so the directory never mixes two runs."""
        if not self.overwrite:
            return
        for name in OUTPUT_FILES:
            if name not in written:
                self.file(name).unlink(missing_ok=True)
