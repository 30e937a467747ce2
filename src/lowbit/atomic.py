"""Atomic writes: output appears complete under its final name, or not at all.

Temporaries live beside the destination as ``.NAME.tmp-PID@HOST-XXXX`` (and ``.NAME.old-PID@HOST`` while an
overwrite swaps directories). The owner in the name lets the next write to the same destination remove what a
killed process left behind (SIGKILL, power loss) without ever touching a live writer's temporary.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from lowbit.errors import DestinationError

_OWNER = re.compile(r"(\d+)@([0-9a-f]{8})(?:-[a-z0-9_]+)?")


def _host() -> str:
    # a short, filename-safe host id: a PID only means something on the machine that wrote it (shared folders)
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
    return f"{os.getpid()}@{_host()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _stale(rest: str) -> bool:
    """Whether the owner part of a temporary's name (``PID@HOST-XXXX``) names a dead process of this host."""
    m = _OWNER.fullmatch(rest)
    return bool(m) and m[2] == _host() and int(m[1]) != os.getpid() and not _alive(int(m[1]))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_stale_temps(final: Path | str) -> list[Path]:
    """Remove the temporaries that dead processes left beside ``final``; returns what was removed or restored.

    A stale ``.old-`` directory is the previous output of an overwrite killed between its two renames: it is put
    back under ``final`` if nothing took that name, so no finished work is lost."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    done = []
    for kind in ("tmp", "old"):
        prefix = f".{final.name}.{kind}-"
        for p in final.parent.glob(glob.escape(prefix) + "*"):
            if not _stale(p.name[len(prefix):]):
                continue
            if kind == "old" and not final.exists():
                with contextlib.suppress(OSError):
                    p.rename(final)
            else:
                _remove(p)
            done.append(p)
    return done


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_destination(final: Path | str, need_bytes: int = 0, overwrite: bool = True) -> None:
    """Fail now, not after the work, if ``final`` cannot be written: it must not exist unless ``overwrite``, and
    its folder (or the nearest existing ancestor, when it is still to be created) must be a writable directory
    with ``need_bytes`` free."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise DestinationError(f"{final} already exists; pass --overwrite (overwrite=True) to replace it")
    base = _existing_ancestor(final.parent)
    if not base.is_dir():
        raise DestinationError(f"cannot write {final}: {base} is not a directory")
    try:  # a real probe: permission bits lie for root and for read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DestinationError(f"cannot write {final}: {base} is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(base).free
    if need_bytes > free:
        raise DestinationError(f"not enough space for {final}: it needs about {need_bytes / 1e6:.1f} MB, "
                               f"{base} has {free / 1e6:.1f} MB free")


def _write_error(final: Path, e: OSError) -> DestinationError:
    what = f"{e.strerror} ({e.filename})" if e.strerror and e.filename else (e.strerror or str(e))
    hint = " (disk full)" if e.errno == errno.ENOSPC else ""
    return DestinationError(f"cannot write {final}: {what}{hint}; nothing was written")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the final renames run, then deliver them: an interrupt between two renames would
    otherwise leave the previous output hidden under its ``.old-`` name."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    # handlers can only be changed from the main thread, and one installed outside Python cannot be put back
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, sigs):
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending[:1]:
            signal.raise_signal(s)  # now the previous handler (or the default action) takes it


def _mkdir(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(final, e) from None


def _commit_dir(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f".{final.name}.old-{_owner()}")
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)  # put the previous output back
        raise
    _remove(old)


def _umask() -> int:
    """The process's umask (os has no getter: Linux reports it in /proc/self/status; elsewhere it is set and put
    back)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(final: Path, folder: bool) -> int:
    """The permissions an output written to ``final`` gets: those of the output it replaces (a folder's for a
    folder, a file's for a file), else what creating it directly would give (0777 or 0666 less the umask). mkstemp
    and mkdtemp make their temporaries private (0600, 0700), which the rename would otherwise hand on: a model
    folder or GGUF file that another user (a server's account, a container) cannot read."""
    with contextlib.suppress(OSError):
        st = final.stat()
        if stat.S_ISDIR(st.st_mode) == folder:
            return stat.S_IMODE(st.st_mode)
    return (0o777 if folder else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_dir(final: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it is renamed to ``final``.

    On any exception (Ctrl-C and SIGTERM through the CLI included) the temporary directory is removed and ``final``
    is untouched; an OSError (disk full, read-only, no permission) becomes a :class:`DestinationError`.
    """
    final = Path(final)
    remove_stale_temps(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
    _mkdir(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_owner()}-", dir=final.parent))
    except OSError as e:
        raise _write_error(final, e) from None
    with contextlib.suppress(OSError):
        os.chmod(tmp, _mode(final, folder=True))
    with _cleanup_on_error(tmp, final):
        yield tmp
        with _signals_deferred():
            _commit_dir(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; renamed over ``final`` only if the block succeeds."""
    final = Path(final)
    remove_stale_temps(final)
    _mkdir(final)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{_owner()}-", dir=final.parent)
    except OSError as e:
        raise _write_error(final, e) from None
    with contextlib.suppress(OSError):  # a file system without modes keeps its own
        os.fchmod(fd, _mode(final, folder=False))
    os.close(fd)
    tmp = Path(name)
    with _cleanup_on_error(tmp, final):
        yield tmp
        with _signals_deferred():
            os.replace(tmp, final)


@contextlib.contextmanager
def _cleanup_on_error(tmp: Path, final: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        _remove(tmp)
        if isinstance(e, FileExistsError):
            raise
        raise _write_error(final, e) from e
    except BaseException:
        _remove(tmp)
        raise
