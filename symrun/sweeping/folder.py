"""A sweep folder's files, written and read without ever following a link inside the folder.

A sweep folder may come from someone else (a colleague's results, an archive) and be resumed,
collected or reported on here. Any name inside it could be a symbolic link planted so that symrun
writes over, or reads in, a file elsewhere (~/.bashrc, a private data set that would then travel
with the tables). So every write, read and removal below a folder's root goes through this module:

- each folder between the root and the file is opened relative to the one before it with
  O_NOFOLLOW | O_DIRECTORY (openat), so a link anywhere on the way is refused, and a folder that
  was checked cannot be swapped for a link before it is used;
- a file is written to a fresh random name created with O_CREAT | O_EXCL | O_NOFOLLOW in the
  target's own folder (it cannot exist, let alone be a link), flushed, then renamed over the
  target: a rename replaces a link at the target's name instead of writing through it, and a
  crash never leaves half a file under the real name;
- a file is read with O_NOFOLLOW, and only when it is a regular file.

The root itself, as the user names it (`hydra.sweep.dir=`, `symrun report DIR`), may be a link:
that is the user's own choice, and it is followed once. Errors are OutputError, one line each.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK      # NONBLOCK: a FIFO must not hang us
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_SUFFIX = ".tmp"   # write_atomic's temporary names: .<name>.<8 hex>.tmp


T = TypeVar("T")
WRITE_PART_MIN = 512    # the fewest items `write_each` gives a part: a smaller batch is written here


class OutputError(OSError):
    """A results location or file that cannot be used (unwritable, full, a link inside a sweep
    folder, another sweep holds it); the message is one line that says what to do."""


def link_error(path: Path) -> OutputError:
    return OutputError(f"{path} is a symbolic link: symrun never writes or reads through a link inside a sweep "
                       "folder (it could point anywhere); remove the link, or use another folder")


def _error(e: OSError, path: Path, verb: str) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"no space left on the disk to write {path}; nothing was replaced "
                           "(the file is written to a temporary name first): free some space and run the command again")
    if e.errno == errno.ELOOP:
        return link_error(path)
    if e.errno == errno.ENOTDIR:
        return OutputError(f"cannot use {path}: a folder on its way is a file, not a folder")
    return OutputError(f"cannot {verb} {path}: {e.strerror}")


def names(path: Path, root: Path) -> tuple[str, ...]:
    """The names leading from `root` to `path`, read lexically (no link is resolved)."""
    target, base = os.path.abspath(path), os.path.abspath(root)
    if target.startswith(base + os.sep):     # the usual case, without relpath's walk (both are normalised)
        return tuple(target[len(base) + 1:].split(os.sep))
    rel = os.path.relpath(target, base)
    parts = () if rel == "." else tuple(rel.split(os.sep))
    if parts[:1] == ("..",):
        raise OutputError(f"{path} is not inside {root}")
    return parts


@contextlib.contextmanager
def _opened(root: Path, folders: tuple[str, ...], create: bool) -> Iterator[int]:
    """A descriptor of the folder root/folders[0]/…, each opened relative to the one before with
    O_NOFOLLOW; missing ones are made when `create` (a missing one raises FileNotFoundError
    otherwise). A link or a file on the way raises OutputError naming it."""
    if create:
        os.makedirs(root, exist_ok=True)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:     # the root's path runs through a file: there is no such folder
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(root)) from None
    try:
        for i, name in enumerate(folders):
            inner = _step(name, fd, create, Path(root, *folders[: i + 1]))
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def _step(name: str, fd: int, create: bool, where: Path) -> int:
    """_open_folder, its errors named after `where` (the folder's path): FileNotFoundError when
    it is missing and not `create`, OutputError when it is a link or cannot be opened."""
    try:
        return _open_folder(name, fd, create)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
            raise link_error(where) from None
        raise _error(e, where, "open") from None


def _open_folder(name: str, fd: int, create: bool) -> int:
    """The folder `name` in the open folder `fd`, opened with O_NOFOLLOW; made first when it is
    missing and `create` (tried open-first: a sweep's folders mostly exist already)."""
    try:
        return os.open(name, _DIR, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_fd=fd)
    return os.open(name, _DIR, dir_fd=fd)


_deferred = False     # inside `one_sync`: the fsyncs are one syncfs at its end


def write_atomic(path: Path, content: str | bytes, root: Optional[Path] = None) -> None:
    """Write `content` to `path` inside `root` (default: its own folder): to a fresh temporary
    name in the same folder, flushed to disk (at the end of an enclosing `one_sync`), then renamed
    over `path` (see the module docstring). Folders on the way are made as needed. A failure
    leaves the old file, if any, untouched."""
    path = Path(path)
    *folders, name = names(path, path.parent if root is None else root)
    try:
        with _opened(path.parent if root is None else Path(root), tuple(folders), create=True) as fd:
            _write_at(fd, name, content, path)
    except OutputError:
        raise
    except OSError as e:
        raise _error(e, path, "write") from None


def _write_at(fd: int, name: str, content: str | bytes, path: Path) -> None:
    """write_atomic's temporary file and rename, in the open folder `fd` (`path`: for errors)."""
    data = content.encode() if isinstance(content, str) else content
    tmp = f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        out = os.open(tmp, _NEW, 0o666, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as f:
                f.write(data)
                f.flush()
                if not _deferred:
                    os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise
    except OSError as e:
        raise _error(e, path, "write") from None


class Opened:
    """A folder inside a sweep folder, opened once as write_atomic opens it (each folder on the
    way with O_NOFOLLOW), for several files: a run's files cost one walk from the root, not one
    each (a 4,608-run sweep writes ~23,000 files)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def write_atomic(self, name: str, content: str | bytes) -> None:
        _write_at(self.fd, name, content, self.path / name)

    def read_bytes(self, name: str) -> bytes:
        return _read_at(self.fd, name, self.path / name)

    def kind(self, name: str) -> Optional[str]:
        """`kind` of the entry `name` in this folder."""
        return _kind_at(self.fd, name)


@contextlib.contextmanager
def opened(path: Path, root: Path, create: bool = True) -> Iterator[Opened]:
    """The folder `path` inside `root`, made as needed when `create`, for write_atomic and
    read_bytes by name. Not `create`: FileNotFoundError when it is missing; OutputError when it,
    or a folder on its way, is a link."""
    with contextlib.ExitStack() as stack:
        try:
            fd = stack.enter_context(_opened(Path(root), names(path, root), create=create))
        except FileNotFoundError:
            if create:
                raise _error(OSError(errno.ENOENT, "no such folder"), Path(path), "write") from None
            raise
        except OutputError:
            raise
        except OSError as e:
            raise _error(e, Path(path), "write") from None
        yield Opened(fd, Path(path))


class Folders:
    """A folder inside a sweep folder, opened once as `opened` opens it, for many folders in it
    by name: a sweep's runs/, whose thousands of run folders each cost one openat (made as
    needed) instead of a walk from the root. The folder stays the one opened: it is not looked up
    by its path again, so a link put at its name meanwhile is never followed either."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @contextlib.contextmanager
    def opened(self, name: str, create: bool = True) -> Iterator[Opened]:
        """The folder `name` in this one, as `opened` would give it (the same errors)."""
        where = self.path / name
        try:
            fd = _step(name, self.fd, create, where)
        except FileNotFoundError:
            if create:
                raise _error(OSError(errno.ENOENT, "no such folder"), where, "write") from None
            raise
        try:
            yield Opened(fd, where)
        finally:
            os.close(fd)


@contextlib.contextmanager
def folders(path: Path, root: Path, create: bool = True) -> Iterator[Folders]:
    """The folder `path` inside `root`, opened once (`opened`), to open many folders in it."""
    with opened(path, root, create) as parent:
        yield Folders(parent.fd, parent.path)


@contextlib.contextmanager
def one_sync(where: Path) -> Iterator[None]:
    """The files written inside are made durable together when it ends, by one syncfs(2) of
    `where`'s filesystem, instead of an fsync each (~1 ms apiece here: 22,000 of them for a
    4,352-run sweep). Write a completion marker after the block holding its run's files."""
    global _deferred
    outer, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = outer
        if not outer:
            sync_filesystem(Path(where))


def sync_filesystem(where: Path) -> None:
    """syncfs(2) on the filesystem holding the folder `where` (its dirty files and renames, at
    once); os.sync() where the C library has no syncfs."""
    import ctypes

    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if getattr(ctypes.CDLL(None, use_errno=True), "syncfs", lambda _: -1)(fd) == 0:
            return
    finally:
        os.close(fd)
    os.sync()


def read_bytes(path: Path, root: Optional[Path] = None) -> bytes:
    """The bytes of the regular file `path` inside `root` (default: its own folder), reached
    without following a link. FileNotFoundError when it (or a folder on its way) is missing;
    OutputError when it is a link, or not a regular file."""
    path = Path(path)
    *folders, name = names(path, path.parent if root is None else root)
    with _opened(path.parent if root is None else Path(root), tuple(folders), create=False) as fd:
        return _read_at(fd, name, path)


def _read_at(fd: int, name: str, path: Path) -> bytes:
    try:
        handle = os.open(name, _READ, dir_fd=fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _error(e, path, "read") from None
    with os.fdopen(handle, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OutputError(f"{path} is not a regular file")
        return f.read()


def read_text(path: Path, root: Optional[Path] = None) -> str:
    return read_bytes(path, root).decode("utf-8")


def kind(path: Path, root: Path) -> Optional[str]:
    """What `path` inside `root` is — "dir", "file", "link" or "other" — without following a
    link; None when it is missing. A link on the way to it raises OutputError."""
    *folders, name = names(path, root)
    try:
        with _opened(Path(root), tuple(folders), create=False) as fd:
            return _kind_at(fd, name)
    except FileNotFoundError:
        return None


def _kind_at(fd: int, name: str) -> Optional[str]:
    try:
        mode = os.lstat(name, dir_fd=fd).st_mode
    except FileNotFoundError:
        return None
    return ("link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "other")


def entries(folder: Path, root: Path) -> dict[str, str]:
    """{name: kind} of the entries of `folder` inside `root` (kinds as `kind`); {} when it is
    missing. The folder must be reached without a link (OutputError otherwise)."""
    try:
        with _opened(Path(root), names(folder, root), create=False) as fd:
            with os.scandir(fd) as it:
                found = {e.name: ("link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False)
                                  else "file" if e.is_file(follow_symlinks=False) else "other") for e in it}
    except FileNotFoundError:
        return {}
    return found


def remove(path: Path, root: Path) -> bool:
    """Delete the file (or link: never its target) `path` inside `root`; False when missing."""
    *folders, name = names(path, root)
    try:
        with _opened(Path(root), tuple(folders), create=False) as fd:
            os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        return False
    return True


def remove_if_empty(path: Path, root: Path) -> bool:
    """Delete the folder `path` inside `root` when it is empty; False when it is not (or is
    missing, or is a link, which is never followed nor removed)."""
    *folders, name = names(path, root)
    try:
        with _opened(Path(root), tuple(folders), create=False) as fd:
            os.rmdir(name, dir_fd=fd)
    except OSError:         # not empty, missing, a link or a file (ENOTDIR), or on the way to it
        return False
    return True


def remove_temps(root: Path, folders: list[Path]) -> list[Path]:
    """Delete write_atomic's temporary files (`.<name>.<hex>.tmp`) that a killed process left in
    `folders` (inside `root`); folders that are links, or missing, are skipped, never entered."""
    removed = []
    for folder in folders:
        try:
            found = entries(folder, root)
        except OutputError:
            continue
        for name, what in found.items():
            if name.startswith(".") and name.endswith(TEMP_SUFFIX) and what in ("file", "link"):
                remove(Path(folder) / name, root)
                removed.append(Path(folder) / name)
    return removed


def open_lock(path: Path) -> int:
    """A read-write descriptor of the lock file `path` (created if missing), never through a
    link: a lock that is a link would truncate and overwrite its target."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        raise _error(e, Path(path), "open") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path} is not a regular file: remove it, or use another folder")
    return fd


def write_each(fn: Callable[[T], None], items: Sequence[T]) -> None:
    """fn(item) for every item (writing a batch of run folders' files), shared out in contiguous
    parts over this process and forked copies of it, one part per core, when each part gets at
    least WRITE_PART_MIN items (on Linux; elsewhere, for fewer items, or when no process can be
    forked, one after another here).

    A run's files cost little Python and many system calls (a folder, and for each file a
    create, a write and a rename), and on this project's ext4 disk the kernel's time in them is
    most of a large sweep's file time. A forked copy starts with everything it needs in its
    memory and runs on a core of its own: a 4,352-run pack's metrics, parameters and statuses
    took 1.7–4.3 s over two processes against 2.5–7.5 s here alone (BENCHMARKS.md). Threads did
    not do it: their Python parts contend for the interpreter lock, and two were slower than
    one. The forked copies write and exit: they never touch a GPU (a run's tensors are on the
    CPU by then), return nothing and print nothing.

    Every copy is waited for before this returns or raises, whatever happened here, so no file
    is still being written afterwards. An error here is raised as it is; otherwise a copy's
    error is raised here (`_reaped`: an OutputError as itself, so a full disk stops the sweep,
    resumable, as it would one after another; a copy killed, as an OutputError too)."""
    parts = min(cores(), len(items) // WRITE_PART_MIN) if sys.platform.startswith("linux") else 1
    if parts < 2:
        for item in items:
            fn(item)
        return
    size = -(-len(items) // parts)
    children: list[tuple[int, int]] = []
    here = len(items)          # items[:size] and items[here:] are done in this process
    try:
        for start in range(size, len(items), size):
            try:
                children.append(_forked(fn, items[start:start + size]))
            except OSError:    # no process to be had (a limit on processes or memory): the rest here
                here = start
                break
        for item in (*items[:size], *items[here:]):
            fn(item)
    finally:
        errors = [_reaped(pid, pipe) for pid, pipe in children]
    for error in errors:
        if error is not None:
            raise error


def _forked(fn: Callable[[T], None], items: Sequence[T]) -> tuple[int, int]:
    """A forked copy of this process doing fn(item) for `items`, then exiting at once (no exit
    handlers, no buffers flushed: they are the parent's); (its pid, the pipe its error comes
    back through)."""
    read, write = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        raise
    if pid:
        os.close(write)
        return pid, read
    code = 1
    try:
        os.close(read)
        # another thread of the parent may have held sys.stdout's or stderr's lock at the fork
        sys.stdout = sys.stderr = open(os.devnull, "w")
        for item in items:
            fn(item)
        code = 0
    except BaseException as e:  # noqa: BLE001 — sent to the parent, which raises it
        with contextlib.suppress(BaseException):
            kind = "OutputError" if isinstance(e, OutputError) else type(e).__name__
            os.write(write, f"{kind}\0{e}".encode("utf-8", "replace")[:60000])
    finally:
        os._exit(code)


def _reaped(pid: int, pipe: int) -> Optional[BaseException]:
    """Wait for the forked copy `pid`: its error, or None when it did all its items. A copy
    interrupted (Ctrl-C) is a KeyboardInterrupt here; one that ended without a word (killed:
    the kernel's OOM killer, a signal) is an OutputError, as a folder that cannot be written:
    the sweep stops, resumable; another error in it (a bug) is a RuntimeError naming it."""
    with os.fdopen(pipe, "rb") as f:
        sent = f.read().decode("utf-8", "replace")
    _, status_ = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status_)
    if code == 0 and not sent:
        return None
    kind, _, message = sent.partition("\0")
    if kind == "OutputError":
        return OutputError(message)
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt()
    if sent:
        return RuntimeError(f"a process writing a sweep's files failed: {kind}: {message}")
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return OutputError(f"a process writing the sweep's files ended before it had written them all ({how}); "
                       "the runs it was writing are not recorded")


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
