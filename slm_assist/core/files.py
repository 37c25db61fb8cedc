"""Output files and directories: checked before any work, written atomically (complete or absent, never
half-written), with the permissions a plain write would have had, and replaced only when they are ours.

Every command follows the same rule: validate every input first; check the output location (writable, not a
file, not someone else's folder); build the new output under a temp name next to it; rename it over the old one
only when it is complete. Nothing that is not our own output is ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from slm_assist.core.errors import UserError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, which races with
    threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(is_dir: bool) -> int:
    """The mode `open()` / `mkdir()` would give under the current umask. mkstemp/mkdtemp make private files
    (0600/0700): on a shared cluster a colleague could not read our outputs."""
    return (0o777 if is_dir else 0o666) & ~_umask()


_LOW_SPACE = 64 << 20
"""Below this many free bytes an errno-less write failure is put down to a full disk: torch's writers report a
short write only as "unexpected pos ..." or "basic_ios::clear: iostream error"."""


def out_of_space(e: BaseException, where: Path) -> bool:
    """Whether the write failure `e` under directory `where` means the disk (or the user's quota) is full. An
    OSError says so by its errno; safetensors' error by its text ("os error 28"); torch's writers say nothing, so
    for their RuntimeError the free space decides. Call it before removing the partial output: its bytes are part
    of what filled the disk."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    if any(s in text for s in ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")):
        return True
    if isinstance(e, RuntimeError):
        try:
            return shutil.disk_usage(_nearest_existing(where)).free < _LOW_SPACE
        except OSError:
            return False
    return False


class NoSpaceError(UserError):
    """A write ran out of space (its message names the directory `where` and what was kept)."""

    def __init__(self, message: str, where: Path) -> None:
        super().__init__(message)
        self.where = Path(where)


def no_space_error(where: Path, what: str, kept: str) -> NoSpaceError:
    """The message for a write that ran out of space: which directory, what was being written, what was kept."""
    try:
        free = f" ({shutil.disk_usage(_nearest_existing(where)).free / 2**20:.1f} MiB free now)"
    except OSError:
        free = ""
    return NoSpaceError(f"no space left on {where}{free} while writing {what}; {kept}. Free some space (or choose "
                        "another location) and run the same command again", where)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, plain_mode(is_dir=False))
        os.replace(tmp, path)
    except BaseException as e:
        full = out_of_space(e, path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            kept = f"{path} was left as it was" if path.exists() else f"{path} was not written"
            raise no_space_error(path.parent, path.name, kept) from None
        raise


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe(where: Path, field: str, path: Path) -> None:
    """Create and remove a file in `where`: a real test, since `os.access` says yes to root on read-only mounts."""
    if not where.is_dir():
        raise UserError(f"{field}={path}: {where} is a file, so the directory cannot be created")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".slm_assist-probe-")
    except OSError as e:
        raise UserError(f"{field}={path}: cannot write in {where} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable(path: str | Path, field: str, replace: bool = False) -> None:
    """`path` is a directory we will create or write into (`replace`: rename a new one over): fail now, before
    any expensive work, if it is a file, sits under a file, or lies where we cannot create files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{field}={path}: is a file, not a directory")
    _probe(_nearest_existing(path), field, path)
    if replace and path.exists():  # the new one is built next to it and renamed over it
        _probe(_nearest_existing(path.parent), field, path)


def check_output_file(path: str | Path, field: str) -> Path:
    """`path` is a file we will write atomically (creating missing parent directories): not a directory, and
    its nearest existing parent accepts new files."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{field}={path}: is a directory; give a file path")
    _probe(_nearest_existing(path.parent), field, path)
    return path


_OUR_HIDDEN = (".*.tmp-*", ".*.old-*", ".*.trash-*", ".slm_assist-probe-*", ".slm_assist.lock", ".score.lock")
"""Hidden names we create ourselves (temp copies, old copies moved aside, probes); other hidden entries (.git,
.env...) are the user's."""


def foreign_entries(path: Path, own: Sequence[str]) -> list[str]:
    """Names in directory `path` that match neither `own` (glob patterns) nor our own temp names."""
    return sorted(p.name for p in path.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in (*own, *_OUR_HIDDEN)))


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "overwrite", field: str = "out_dir",
                     own: Sequence[str] | None = None) -> None:
    """The output directory can be written and replaced, and an existing non-empty one is replaced only when the
    user said so and, when `own` (our output's entry names) is given, only when everything in it is ours."""
    path = Path(path)
    check_writable(path, field, replace=True)
    if not (path.is_dir() and any(path.iterdir())):
        return
    if not overwrite:
        raise UserError(f"{field}={path}: exists and is not empty; set {flag}=true to replace it")
    if own is not None and (foreign := foreign_entries(path, own)):
        raise UserError(f"{field}={path}: holds files this command did not write ({', '.join(foreign[:5])}); "
                        f"{flag}=true replaces only our own output. Choose another {field} or empty it yourself")


def clean_stale(path: Path) -> None:
    """Leftovers of an atomic replacement that was killed: temp copies and copies being deleted are dropped; a
    complete old copy that was moved aside but never replaced is put back (it is the only complete one)."""
    old = sorted(path.parent.glob(f".{path.name}.old-*"))
    if old and not path.exists():
        os.replace(old.pop(), path)
    for p in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.trash-*"), *old]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _plain_modes(root: Path) -> None:
    """Give everything under `root` the mode a plain write would have had: some writers we call (safetensors via
    save_pretrained) make private files."""
    file_mode, dir_mode = plain_mode(is_dir=False), plain_mode(is_dir=True)
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows one (no bytes copied), a copy otherwise; a symlink stays a link."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, own: Sequence[str]) -> list[str]:
    """Entries of the old output `old` that we did not write (matching none of `own`, none of our temp names, and
    not written anew) are linked into `new`, so replacing `old` keeps them. Linked, not moved: until the swap, the
    old output is still whole, so a kill at any point loses nothing."""
    kept = []
    for name in foreign_entries(old, own):
        src, dst = old / name, new / name
        if dst.exists() or dst.is_symlink():
            continue  # ours now: the new output writes that name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(str(src), str(dst))
        kept.append(name)
    return kept


@contextlib.contextmanager
def atomic_output_dir(path: Path, own: Sequence[str], overwrite: bool = False, flag: str = "overwrite",
                      field: str = "out_dir") -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success it replaces `path`, on failure it is removed.
    `own`: glob patterns of the entries this writer makes. An existing output is replaced only as far as it is
    ours: anything else in it (a README the user added) is carried into the new one. A symlink at `path` is
    followed (what it points to is replaced, keeping the link), with the same rule, so nothing the link reaches
    is deleted unless we wrote it. One writer per `path`: leftovers of an earlier killed writer are cleaned first.
    A full disk is one clear error, and the old output stays as it was."""
    path = Path(path).absolute()  # "." has no name to build a sibling's from
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    check_output_dir(path, overwrite, flag, field)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        kept = _carry_over(path, tmp, own) if path.is_dir() else []
        _plain_modes(tmp)
        _swap_in(tmp, path, field)
        if kept:
            print(f"{field}={path}: kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} this command did not "
                  f"write ({', '.join(kept[:5])})", flush=True)
    except BaseException as e:
        # a file written inside (atomic_write_text) that ran out of space names the temp copy: say it of `path`
        inside = isinstance(e, NoSpaceError) and (e.where == tmp or tmp in e.where.parents)
        full = inside or (not isinstance(e, UserError) and out_of_space(e, path.parent))
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            kept = f"{path} was left as it was" if path.exists() else f"nothing was written to {path}"
            raise no_space_error(path.parent, f"{field}={path}", kept) from None
        raise


def remove_output(path: Path, own: Sequence[str]) -> None:
    """Delete an output of ours: the entries of directory `path` matching `own`, then `path` itself if that leaves
    it empty. A symlink is never followed out of our tree: a link at `path` stays (with what it points to, minus
    our entries), and links inside it are removed as links."""
    path = Path(path)
    if not (path.is_dir() or path.is_symlink()):
        return
    if not path.is_dir():  # a dangling link: nothing of ours behind it
        return
    for entry in path.iterdir():
        if any(fnmatch.fnmatch(entry.name, pat) for pat in (*own, *_OUR_HIDDEN)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    if not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()


def _swap_in(new: Path, path: Path, field: str) -> None:
    """Rename `new` over `path`. The old copy is moved aside (`.old-*`: complete, put back by `clean_stale` if we
    die here), then renamed `.trash-*` before it is deleted, so a half-deleted copy is never mistaken for one."""
    if not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        os.replace(path, old)
    except OSError as e:  # e.g. a mount point
        raise UserError(f"{field}={path}: cannot replace it ({e.strerror or e}); choose another {field}") from None
    try:
        os.replace(new, path)
    except OSError as e:
        os.replace(old, path)
        raise UserError(f"{field}={path}: cannot replace it ({e.strerror or e}); it was left as it was") from None
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(old, trash)
    shutil.rmtree(trash, ignore_errors=True)


class LockBusy(Exception):
    """Another process holds the lock; `holders` says who (pid, host, since when)."""

    def __init__(self, holders: str) -> None:
        super().__init__(holders)
        self.holders = holders


@contextlib.contextmanager
def lock_file(path: Path, exclusive: bool = True, remove: bool = False) -> Iterator[bool]:
    """Hold an advisory lock (flock) on `path`, created if missing, while the block runs: exclusive, or shared
    with other shared holders. The kernel drops it when the process ends, `kill -9` included, so a lock is never
    stale. The file lists its holders (pid, host, time) for the message of a process that is refused (`LockBusy`).
    `remove`: the last holder deletes the file. Yields False on a filesystem without locks (nothing is held)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, plain_mode(is_dir=False))
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _holders(fd)
            os.close(fd)
            raise LockBusy(holders) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            yield False
            return
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the last holder removed it as we opened it: take the new one
    try:
        if exclusive:
            os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        yield True
    finally:
        if remove:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only the last holder gets it
                path.unlink(missing_ok=True)
        os.close(fd)


def _holders(fd: int) -> str:
    try:
        lines = [line for line in os.pread(fd, 4096, 0).decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return ", ".join(dict.fromkeys(lines[-3:])) if lines else "a process whose pid is not recorded"
