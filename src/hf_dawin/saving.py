"""Atomic folder saves: files are written into a staging folder, then moved into the target folder.

An interrupted write (an error, a full disk, Ctrl-C) leaves the target folder as it was, because nothing reaches
it until every file is complete. Each file then replaces its previous version with `os.replace`, which is atomic
on one filesystem. Before the first move, the save writes a journal of its moves and keeps each file that a move
replaces. An exception during the moves puts the replaced files back at once. SIGTERM and SIGHUP wait until the
moves are done. A process killed outright (SIGKILL, the out-of-memory killer) during the moves leaves the journal
behind, and the next save into the folder, or the next load of a DaWin model from it, puts the previous files back
([`recover_interrupted_save`]).

Each save works in its own folder, beside the target or inside it:

    .<target>.saving-<process id>-<random>/   (".saving-<process id>-<random>/" inside the target)
        lock           locked (flock) by the saving process until the save ends
        staged/        the files being written
        previous/      the files that the moves replaced or removed
        journal.json   the moves, present from before the first move until after the last one

The kernel releases the lock when the process dies, so a work folder whose lock is free belongs to a save that
ended without cleaning up, even where process ids are reused (containers). The moves of a save and every recovery
also hold a lock (flock) on the target folder itself, so two saves into one folder write in parallel but move
their files in one after the other, and a journal found under that lock belongs to a killed save.

Every written file, the journal and each changed folder are flushed to disk (fsync) before the step that relies on
them. After a power loss during the moves, the journal and the kept files are therefore on disk for the recovery,
on filesystems that honour fsync.

NOTE: on systems without `fcntl` (Windows) saves are not serialised and a killed save is not recovered. A load that
runs while a save moves its files in can read files of both saves. This module uses the standard library only,
because it is copied beside saved models as remote code.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


__all__ = [
    "current_umask",
    "is_weight_file",
    "move_into_place",
    "pop_push_arguments",
    "recover_interrupted_save",
    "remove_abandoned_folders",
    "save_atomically",
]

logger = logging.getLogger(__name__)

_WORK_MARK = ".saving-"
_LOCK = "lock"
_STAGED = "staged"
_PREVIOUS = "previous"
_JOURNAL = "journal.json"
# A work folder gets its lock file microseconds after it is created, so one without a lock file for this long
# belongs to a save that was killed in between, or to an older hf_dawin.
_LOCKLESS_SECONDS = 60.0
# Signals that end a process by default and that launchers send. torchrun and `accelerate launch` send SIGTERM to
# the other ranks when one fails, Slurm and `docker stop` send it to stop a job, and closing a terminal sends SIGHUP.
_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def is_weight_file(name: str) -> bool:
    """Return whether a file name is a safetensors weight file or index written by `save_pretrained`."""
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def _process_is_gone(pid: int) -> bool:
    """Return whether no process with this id exists on this machine (POSIX only; elsewhere always False)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_abandoned_folders(parent: Path, prefix: str) -> None:
    """Remove folders in `parent` named `<prefix><process id>-...` whose process no longer exists (it was killed).

    NOTE: process ids are looked up on this machine, so on a folder shared between machines a write that is
    still running on another machine looks abandoned. Do not write into one target from two machines at once.
    """
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and _process_is_gone(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def current_umask() -> int:
    """Return the process's file mode creation mask (reading it requires setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk with fsync, so that it survives a power loss.

    Folders are skipped where they cannot be opened or synced (Windows, some FUSE filesystems), because there a
    rename is made durable by the filesystem itself or not at all.
    """
    is_folder = path.is_dir()
    try:
        descriptor = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_folder else 0))
    except OSError:
        if is_folder:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not is_folder:
            raise
    finally:
        os.close(descriptor)


def _sync_folders(root: Path, relatives) -> None:
    """Sync `root` and every folder between it and the files at the `relatives` paths inside it."""
    folders = {root}
    for relative in relatives:
        folders.update(root / parent for parent in Path(relative).parents)
    for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
        _sync(folder)


def move_into_place(temporary: Path, path: Path) -> None:
    """Move a finished temporary file onto `path`, with the mode an ordinary new file gets under the umask.

    `tempfile.NamedTemporaryFile` creates files readable by their owner only, but results and figures are meant
    to be shared, so the file first gets 0644 under the usual umask 022.
    """
    os.chmod(temporary, 0o666 & ~current_umask())
    os.replace(temporary, path)


def _make_work_folder(target: Path) -> Path:
    """Create an empty work folder on the target's filesystem: beside the target, or inside it.

    Beside the target keeps the folder free of half-written files. Inside is the fallback when the parent cannot
    be written (a save into the current directory, for example) or lies on another filesystem (the target is a
    mount point), where the final renames would fail.
    """
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}{_WORK_MARK}{os.getpid()}-", dir=target.parent))
        if os.stat(work).st_dev != os.stat(target).st_dev:
            work.rmdir()
            work = Path(tempfile.mkdtemp(prefix=f"{_WORK_MARK}{os.getpid()}-", dir=target))
    except OSError:
        work = Path(tempfile.mkdtemp(prefix=f"{_WORK_MARK}{os.getpid()}-", dir=target))
    # mkdtemp makes the folder private. Other users' loads must be able to read its lock and journal.
    os.chmod(work, 0o777 & ~current_umask())
    return work


def _lock_work_folder(work: Path) -> int | None:
    """Lock the work folder for this process and return the lock's file descriptor (None without `fcntl`).

    The lock file is locked under another name and then renamed, so that another process never finds it unlocked
    while this save runs.
    """
    if fcntl is None:
        return None
    descriptor = os.open(work / f"{_LOCK}.new", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.rename(work / f"{_LOCK}.new", work / _LOCK)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _lock_if_abandoned(work: Path) -> tuple[bool, int | None]:
    """Return whether the save that owns `work` has ended without cleaning up, and the lock taken if so.

    A work folder with a lock file is abandoned when the lock can be taken. One without is abandoned once it is
    older than `_LOCKLESS_SECONDS`. A folder that cannot be read (another user's) counts as in use.
    """
    if fcntl is None:
        return False, None
    lock = work / _LOCK
    try:
        # Read-only, so that a folder that cannot be written is still checked (and its recovery then reports it).
        descriptor = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        try:
            return time.time() - work.stat().st_mtime > _LOCKLESS_SECONDS, None
        except OSError:
            return False, None
    except OSError:
        return False, None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return False, None
    return True, descriptor


@contextlib.contextmanager
def _target_locked(target: Path):
    """Hold an exclusive lock (flock) on the folder `target` itself while the block runs.

    Where the folder cannot be opened or the filesystem has no flock, the block runs without the lock.
    """
    descriptor = None
    if fcntl is not None:
        try:
            descriptor = os.open(target, os.O_RDONLY)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            logger.debug("Saves into %s are not serialised, because the folder cannot be locked.", target)
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _unlock(descriptor: int | None) -> None:
    if descriptor is not None:
        os.close(descriptor)


def _keep_copy(path: Path, copy: Path) -> None:
    """Make `copy` a second name of `path` (a hard link), or a copy where the filesystem has no hard links.

    A copy is written under another name first, so a copy cut short by a kill is never taken for the file.
    """
    copy.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, copy)
    except OSError:
        partial = copy.with_name(f"{copy.name}.partial")
        shutil.copy2(path, partial)
        _sync(partial)
        os.replace(partial, copy)


def _roll_back(target: Path, previous: Path, steps: list[tuple[Path, bool]]) -> None:
    """Undo the moves of a save, in reverse order, from the files kept in `previous`.

    A step is `(relative path, replaced)`. A replaced file is put back if its copy is in `previous`: the copy is
    made before the move, so a missing copy means the move did not happen. A file that was new is removed.
    """
    for relative, replaced in reversed(steps):
        destination = target / relative
        if not replaced:
            destination.unlink(missing_ok=True)
        elif (previous / relative).is_file():
            os.replace(previous / relative, destination)


def _write_journal(journal: Path, steps: list[tuple[Path, bool]]) -> None:
    """Write the moves a save is about to make.

    A journal cut short by a kill cannot be parsed, and no move followed it.
    """
    entries = [{"path": relative.as_posix(), "replaced": replaced} for relative, replaced in steps]
    with open(journal, "w", encoding="utf-8") as handle:
        json.dump({"format": 1, "steps": entries}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _sync(journal.parent)


def _read_journal(journal: Path) -> list[tuple[Path, bool]] | None:
    """Return the steps of a journal, or None if there is no complete journal."""
    try:
        with open(journal, encoding="utf-8") as handle:
            entries = json.load(handle)["steps"]
        return [(Path(entry["path"]), bool(entry["replaced"])) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _commit(work: Path, target: Path, written: list[Path], stale: Callable[[str], bool]) -> None:
    """Move the staged files into `target`, remove its stale files, and undo every step if an exception occurs.

    Each file that a move replaces is first kept in `work/previous`, and the journal lists every move before the
    first one runs. An error or Ctrl-C during the moves puts the previous files back at once. If the process is
    killed instead, the journal stays, and [`recover_interrupted_save`] puts them back later.
    """
    staged, previous, journal = work / _STAGED, work / _PREVIOUS, work / _JOURNAL
    previous.mkdir()
    new_names = {relative.as_posix() for relative in written}
    removed = [
        Path(path.name)
        for path in sorted(target.iterdir())
        if path.is_file() and stale(path.name) and path.name not in new_names
    ]
    steps = [(relative, (target / relative).is_file()) for relative in written] + [(name, True) for name in removed]
    try:
        _write_journal(journal, steps)
        for relative, replaced in steps[: len(written)]:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if replaced:
                _keep_copy(destination, previous / relative)
                # After a power loss, recovery takes a missing copy to mean that the move did not happen.
                _sync_folders(previous, [relative])
            os.replace(staged / relative, destination)
        for relative in removed:
            os.replace(target / relative, previous / relative)
        _sync_folders(previous, removed)
        _sync_folders(target, [relative for relative, _ in steps])
        # The save is complete once the journal is gone.
        journal.unlink()
        _sync(work)
    except BaseException:
        if journal.exists():
            _roll_back(target, previous, steps)
        raise


class _TerminationDeferral:
    """Hold SIGTERM and SIGHUP from `start()` until the `with` block ends, then deliver them to their handlers.

    A save's moves and clean-up are renames and hard links that usually take milliseconds, so a termination request
    waits for the save to finish instead of leaving the folder half-replaced. Python runs signal handlers in the main
    thread only, so in other threads nothing is held. A signal whose handler was not set from Python
    (`signal.getsignal` returns None), or is SIG_IGN, is left alone.
    """

    def __init__(self):
        self._received: list[int] = []
        self._previous_handlers: dict = {}

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in _DEFERRED_SIGNALS:
            handler = signal.getsignal(number)
            if handler is None or handler == signal.SIG_IGN:
                continue
            self._previous_handlers[number] = handler
            signal.signal(number, self._hold)

    def _hold(self, number: int, frame) -> None:
        self._received.append(number)

    def __enter__(self) -> _TerminationDeferral:
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(self._received):
            logger.warning("%s arrived while a save moved its files in. It is delivered now that the save has ended.",
                           signal.Signals(number).name)
            signal.raise_signal(number)


def _work_folders(target: Path) -> list[Path]:
    """Return the work folders of saves into `target`, beside it or inside it."""
    found = []
    for parent, prefix in ((target.parent, f".{target.name}{_WORK_MARK}"), (target, _WORK_MARK)):
        found.extend(path for path in sorted(parent.glob(f"{glob.escape(prefix)}*")) if path.is_dir())
    return found


def _is_file(path: Path) -> bool:
    """Return whether `path` is a file, and False where it cannot be checked (a folder of another user)."""
    try:
        return path.is_file()
    except OSError:
        return False


def recover_interrupted_save(folder: str | os.PathLike) -> bool:
    """Put back the previous files of `folder` if a save into it was killed while it moved its files in.

    A save that an exception interrupts undoes its moves itself. Only a process killed outright leaves its journal
    behind, and then some files of the folder are new and others old. This function undoes those moves from the
    journal and the files the save kept, and removes the work folders of saves that ended without cleaning up. It
    runs at the start of every save into a folder and before a DaWin model or endpoint loads from a local folder.
    A save that is still running is left alone.

    NOTE: a save is known to be running by its lock, so on a network filesystem without working `flock` (some
    NFS setups), do not call it while another machine saves into the same folder.

    Args:
        folder (`str` or `os.PathLike`): The target folder of the earlier save.

    Returns:
        `bool`: Whether an interrupted save was found and its previous files put back.

    Raises:
        OSError: If the previous files cannot be put back (for example a folder that cannot be written). The error
            names the folder that contains them and keeps the errno of the cause.
    """
    target = Path(folder).resolve()
    if not target.is_dir():
        return False
    with _target_locked(target):
        return _recover(target)


def _recover(target: Path) -> bool:
    """Run [`recover_interrupted_save`] on `target` while the caller holds the target's lock."""
    recovered = False
    for work in _work_folders(target):
        abandoned, descriptor = _lock_if_abandoned(work)
        if not abandoned:
            continue
        try:
            steps = _read_journal(work / _JOURNAL)
            if steps is not None:
                # An older layout kept the replaced files at the root of the work folder, beside the journal.
                previous = work / _PREVIOUS if (work / _PREVIOUS).is_dir() else work
                try:
                    _roll_back(target, previous, steps)
                    _sync_folders(target, [relative for relative, _ in steps])
                    (work / _JOURNAL).unlink()
                except OSError as error:
                    failure = OSError(
                        f"A save into {target} was killed while it moved its files in, so the folder mixes new and "
                        f"old files. Putting the old files back failed: {error}. They are kept in {previous}. "
                        f"Make {target} writable and load or save again, which puts them back."
                    )
                    failure.errno = error.errno
                    raise failure from error
                if any(replaced for _, replaced in steps):
                    logger.warning(
                        "A save into %s was killed while it moved its files in. The files it replaced have been put "
                        "back.",
                        target,
                    )
                else:
                    logger.warning(
                        "A save into %s was killed while it moved its files in. It replaced no files, so the files it "
                        "had moved in have been removed.",
                        target,
                    )
                recovered = True
            shutil.rmtree(work, ignore_errors=True)
        finally:
            _unlock(descriptor)
    return recovered


def save_atomically(
    save_directory: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    stale: Callable[[str], bool] = is_weight_file,
) -> Path:
    """Call `write(staging)` on an empty staging folder, then move what it wrote into `save_directory`.

    If `write` raises, the target is left as it was, and a target folder that this call created is removed. If the
    moves are interrupted by an exception (Ctrl-C included), the files they replaced are put back. Files of the
    target that `write` did not produce are kept, except those for which `stale(name)` is true: by default the
    weight files of an earlier save (`model*.safetensors` and their index), which would otherwise mix shards of
    two saves. The staging folder lies on the target's filesystem and is removed in every case.

    Args:
        save_directory (`str` or `os.PathLike`): The folder to save into, created if missing.
        write (`Callable[[Path], None]`): Writes the files, for example `lambda folder: model.save_pretrained(folder)`.
        stale (`Callable[[str], bool]`, *optional*): Whether a file name in the target belongs to an earlier save
            and goes when this save does not write it again; defaults to [`is_weight_file`].

    Returns:
        `Path`: The target folder.

    Raises:
        NotADirectoryError: If `save_directory` is an existing file.
    """
    target = Path(save_directory).resolve()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into {target}, because it is a file. Pass a folder path.")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    work = _make_work_folder(target)
    descriptor = None
    with _TerminationDeferral() as deferral:
        try:
            descriptor = _lock_work_folder(work)
            staged = work / _STAGED
            staged.mkdir()
            try:
                write(staged)
            except BaseException:
                # A folder this call created is removed again, unless something else wrote into it meanwhile.
                if created and not any(path != work for path in target.iterdir()):
                    shutil.rmtree(target, ignore_errors=True)
                raise
            written = sorted(path.relative_to(staged) for path in staged.rglob("*") if path.is_file())
            # The files' data reaches the disk before any rename makes them part of the target.
            for relative in written:
                _sync(staged / relative)
            _sync_folders(staged, written)
            with _target_locked(target):
                # From here on, SIGTERM and SIGHUP wait until the moves and the clean-up are done. They are not held
                # while this save waits for another save's moves, which could take long if that save is stopped.
                deferral.start()
                # A save into the same folder may have been killed while this one wrote its files.
                _recover(target)
                _commit(work, target, written, stale)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _unlock(descriptor)
    return target


# Keyword arguments of `PreTrainedModel.save_pretrained` that only matter with `push_to_hub=True`.
_PUSH_KEYWORDS = ("repo_id", "commit_message", "commit_description", "private", "token", "create_pr", "revision")


def pop_push_arguments(save_directory: str | os.PathLike, kwargs: dict) -> dict | None:
    """Remove `push_to_hub` and its Hub arguments from `save_pretrained` keyword arguments.

    A model that saves through a staging folder pushes after the save instead. The default repository name is
    then the name of `save_directory`, as with `save_pretrained`, not that of the staging folder.

    Returns:
        `dict` or `None`: The `push_to_hub` arguments, `repo_id` included, or None when no push was requested.
    """
    push = kwargs.pop("push_to_hub", False)
    arguments = {name: kwargs.pop(name) for name in _PUSH_KEYWORDS if name in kwargs}
    if not push:
        return None
    arguments.setdefault("repo_id", Path(save_directory).resolve().name)
    return arguments
