"""Crash-safe writes: one file (:func:`atomic`) or a set of shards and their index (:func:`commit_shards`).

Every write goes to a temporary file beside its target, is flushed to disk (``fsync``) and only
then renamed over the target (``os.replace``, atomic on POSIX), and the folder is flushed after
the rename. A reader therefore sees the old file or the new one, never a mixture; a process
killed at any point leaves the previous file in place (plus a temporary, removed by the next
write of the same target); a failed write (disk full, an exception) removes its temporaries.

Sharded checkpoints (:func:`commit_shards`) never rename a new shard over a file the current
index uses: shard names carry a content-derived suffix (:func:`shard_names`), every shard is
written and flushed first, the index is swapped last, and only then are the old shards that the
new index does not use removed (under a lock of the folder, so concurrent writers take turns). Until the index swap the previous checkpoint is loadable; after
it the new one is.

Targets are checked before any work (:func:`elsa_codec.checks.check_target`): a directory, FIFO,
device or socket is refused, a symlink is replaced (never followed).

Temporary names are ``.{12 hex digits of the target name's hash}-{pid}-{random}.elsa-tmp``: under
50 characters whatever the target's length, and they say which target and which process they
belong to (:func:`stale_temporaries`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterable

from ..checks import check_target

__all__ = ["atomic", "commit_shards", "shard_names", "stale_temporaries", "new_temporary", "release_temporary", "fsync_dir"]

_TMP_SUFFIX = ".elsa-tmp"
_OPEN_TMPS: set = set()
#: Called with a step name before each operation of a write (``"write <name>"``, ``"fsync <name>"``,
#: ``"rename <name>"``, ``"fsync-dir"``, ``"replace <name>"``, ``"remove <name>"``): None, or a
#: test's fault injector (tests/format/test_crash_safe.py).
_fault: Callable[[str], None] | None = None


def _step(what: str) -> None:
    if _fault is not None:
        _fault(what)


def tmp_prefix(path: str) -> str:
    """``.{12 hex digits of the target name's hash}-``: temporary names stay short whatever the
    target's length (a legal 255-character name must stay writable) and still say which target
    they belong to."""
    return "." + hashlib.sha256(os.path.basename(path).encode("utf-8", "surrogateescape")).hexdigest()[:12] + "-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(path: str) -> list:
    """Temporary files of earlier writes of ``path`` whose writing process is gone (killed while
    writing): ``[paths]``. The next write of ``path`` removes them; ``elsa verify`` reports them.

    Example:
        >>> stale_temporaries("/nonexistent-folder/model.safetensors")
        []
    """
    d = os.path.dirname(os.path.abspath(path)) or "."
    pre = tmp_prefix(path)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = []
    for n in names:
        if not (n.startswith(pre) and n.endswith(_TMP_SUFFIX)):
            continue
        pid = n[len(pre):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is writing this target right now
        if pid.isdigit() and int(pid) == os.getpid() and n in _OPEN_TMPS:
            continue
        out.append(os.path.join(d, n))
    return sorted(out)


def new_temporary(path: str) -> str:
    """A new empty file beside ``path`` named ``.{hash of path's name}-{pid}-{random}.elsa-tmp``,
    registered as in use by this process (:func:`stale_temporaries` skips it) until
    :func:`release_temporary`."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=f"{tmp_prefix(path)}{os.getpid()}-", suffix=_TMP_SUFFIX, dir=d)
    os.close(fd)
    _OPEN_TMPS.add(os.path.basename(tmp))
    return tmp


def release_temporary(tmp: str, *, remove: bool = True) -> None:
    """No longer in use by this process; removed if it still exists and ``remove``."""
    _OPEN_TMPS.discard(os.path.basename(tmp))
    if remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _remove_stale(path: str) -> None:
    for stale in stale_temporaries(path):
        with contextlib.suppress(OSError):
            os.unlink(stale)


def seal_temporary(path: str, target: str) -> None:
    """Finish the temporary ``path`` of the file named ``target`` before its rename: the usual
    permissions (``mkstemp`` makes 0600), then its data flushed to disk (``fsync``)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    _step(f"fsync {os.path.basename(target)}")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (renames, removals) to disk; a no-op where folders cannot be
    opened or flushed (the renames themselves are still atomic)."""
    try:
        _step("fsync-dir")
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _folder(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)  # the API creates missing folders; the CLI refuses them (a typo)
    return d


@contextmanager
def atomic(path: str):
    """Yield a temporary path beside ``path``; on success flush it, rename it over ``path`` and
    flush the folder; on failure remove it. Stale temporaries of the same target (a killed
    process's) are removed first.

    Raises:
        ELSAError: ``path`` is a directory, FIFO, device or socket (before the body runs).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.txt")
        >>> with atomic(p) as tmp:
        ...     _ = open(tmp, "w").write("hello")
        >>> open(p).read()
        'hello'
    """
    check_target(path)
    d = _folder(path)
    _remove_stale(path)
    tmp = new_temporary(path)
    try:
        _step(f"write {os.path.basename(path)}")
        yield tmp
        seal_temporary(tmp, path)
        _step(f"replace {os.path.basename(path)}")
        os.replace(tmp, path)
        fsync_dir(d)
    finally:
        release_temporary(tmp)


def shard_names(stem: str, groups: list, identity: str) -> list:
    """The file names of ``len(groups)`` shards: ``{stem}-{i:05d}-of-{n:05d}-{suffix}.safetensors``
    with ``suffix`` 16 hex digits of the SHA-256 of ``identity`` (a canonical text of the whole
    checkpoint: its document and checksums) and of the grouping. The same content gives the same
    names (byte-reproducible); another content gives names that cannot collide with a current
    checkpoint's, so writing never replaces a shard an index still uses."""
    h = hashlib.sha256(identity.encode("utf-8", "surrogateescape"))
    for g in groups:
        h.update(b"\0" + "\0".join(sorted(g)).encode("utf-8", "surrogateescape"))
    suffix = h.hexdigest()[:16]
    n = len(groups)
    return [f"{stem}-{i:05d}-of-{n:05d}-{suffix}.safetensors" for i in range(1, n + 1)]


@contextmanager
def _folder_lock(folder: str):
    """An exclusive ``flock`` of ``folder`` itself (no lock file): commits of sharded checkpoints
    into one folder, from any process, run one at a time (a no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def commit_shards(index_path: str, shards: dict, write_index: Callable[[str], None], used_shards: Callable[[], Iterable[str]],
                  orphan: Callable[[str], bool] = lambda name: False) -> None:
    """Write a sharded checkpoint crash-safely: ``shards`` (``{file name: writer(path)}``, names in
    ``index_path``'s folder) and then the index (``write_index(path)``).

    Steps: every shard into its own flushed temporary, the index into one; then, holding the
    folder's lock (:func:`_folder_lock`): the shards renamed to their names (new names:
    :func:`shard_names`); the folder flushed; the index renamed over ``index_path`` (the commit);
    the folder flushed; then the files the previous index used (``used_shards()``, read under the
    lock) and files for which ``orphan(name)`` holds (shards of an earlier write killed before
    its commit) that the new index does not use are removed. A failure before the commit removes
    every temporary and every renamed shard the previous index does not use, so the previous
    checkpoint stays loadable; a failure after it leaves at most unused old shards (removed by
    the next write). Two processes committing into one folder take turns; the last commit wins.

    Raises:
        ELSAError: a target is a directory, FIFO, device or socket (before any work).
    """
    folder = _folder(index_path)
    for t in [index_path] + [os.path.join(folder, n) for n in shards]:
        check_target(t)
    _remove_stale(index_path)
    tmps = {}
    try:
        for name, write in shards.items():
            tmps[name] = new_temporary(index_path)
            _step(f"write {name}")
            write(tmps[name])
            seal_temporary(tmps[name], name)
        tmps[None] = new_temporary(index_path)
        _step(f"write {os.path.basename(index_path)}")
        write_index(tmps[None])
        seal_temporary(tmps[None], index_path)
        with _folder_lock(folder):
            old = {n for n in used_shards() if os.path.basename(n) == n and n not in ("", ".", "..")}
            _swap(index_path, folder, tmps, old)
            fsync_dir(folder)
            _remove_unused(folder, old, set(shards), orphan)
    finally:
        for tmp in tmps.values():
            release_temporary(tmp)


def _swap(index_path: str, folder: str, tmps: dict, old: set) -> None:
    """Rename the shards' temporaries (``tmps``, the index's under None) to their names, flush
    the folder, rename the index's over ``index_path``; on failure remove the renamed shards
    that ``old`` (the previous index's) does not hold."""
    renamed = []
    try:
        for name, tmp in tmps.items():
            if name is None:
                continue
            _step(f"rename {name}")
            os.replace(tmp, os.path.join(folder, name))
            renamed.append(name)
        fsync_dir(folder)
        _step(f"replace {os.path.basename(index_path)}")
        os.replace(tmps[None], index_path)
    except BaseException:
        for name in renamed:
            if name not in old:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
        raise


def _remove_unused(folder: str, old: set, keep: set, orphan: Callable[[str], bool]) -> None:
    """After a commit: remove the previous index's shards and orphaned shards not in ``keep``
    (regular files or links only, inside ``folder`` only)."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return
    for name in sorted(n for n in names if n not in keep and (n in old or orphan(n))):
        p = os.path.join(folder, name)
        if os.path.isdir(p) and not os.path.islink(p):
            continue
        with contextlib.suppress(OSError):  # the commit is done: a file left here is removed by the next write
            _step(f"remove {name}")
            os.unlink(p)
    fsync_dir(folder)
