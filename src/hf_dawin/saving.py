"""Atomic folder saves: files are written into a staging folder, then moved into the target folder.

An interrupted write (an error, a full disk, Ctrl-C) leaves the target folder as it was, because nothing reaches
it until every file is complete. Each file then replaces its previous version with `os.replace`, which is atomic
on one filesystem, and an exception during these moves puts the replaced files back. NOTE: the folder as a whole
is not swapped atomically, so a process killed outright (SIGKILL, power loss) during the moves, which take
milliseconds, can leave some files new and others old. Such a process also leaves its staging folder behind; the
next save into the same target removes it. This module uses the standard library only, because it is copied
beside saved models as remote code.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


__all__ = ["is_weight_file", "move_into_place", "pop_push_arguments", "remove_abandoned_folders", "save_atomically"]

# Staging folders are named ".<target>.saving-<process id>-<random>" beside the target, or
# ".saving-<process id>-<random>" inside it.
_STAGING_MARK = ".saving-"


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


def _remove_abandoned_staging(target: Path) -> None:
    """Remove staging folders of earlier saves into `target`, beside it or inside it, whose process is gone."""
    remove_abandoned_folders(target.parent, f".{target.name}{_STAGING_MARK}")
    remove_abandoned_folders(target, _STAGING_MARK)


def move_into_place(temporary: Path, path: Path) -> None:
    """Move a finished temporary file onto `path`, with the mode an ordinary new file gets under the umask.

    `tempfile.NamedTemporaryFile` creates files readable by their owner only, but results and figures are meant
    to be shared, so the file first gets 0644 under the usual umask 022.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)


def _make_staging(target: Path) -> Path:
    """Create an empty staging folder on the target's filesystem: beside the target, or inside it.

    Beside the target keeps the folder free of half-written files. Inside is the fallback when the parent cannot
    be written (a save into the current directory, for example) or lies on another filesystem (the target is a
    mount point), where the final renames would fail.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING_MARK}{os.getpid()}-", dir=target.parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"{_STAGING_MARK}{os.getpid()}-", dir=target))
    if os.stat(staging).st_dev == os.stat(target).st_dev:
        return staging
    staging.rmdir()
    return Path(tempfile.mkdtemp(prefix=f"{_STAGING_MARK}{os.getpid()}-", dir=target))


def _keep_copy(path: Path, copy: Path) -> None:
    """Make `copy` a second name of `path` (a hard link), or a copy where the filesystem has no hard links."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, copy)
    except OSError:
        shutil.copy2(path, copy)


def _commit(staging: Path, target: Path, written: list[Path], stale: Callable[[str], bool]) -> None:
    """Move the staged files into `target`, remove its stale files, and undo every step if an exception occurs.

    Each file that a move replaces is first kept in a backup folder, so an error or Ctrl-C during the moves puts
    the previous files back. Only a process killed outright during the moves can leave some files new and others
    old.
    """
    backup = Path(tempfile.mkdtemp(prefix=f"{staging.name}-previous-", dir=staging.parent))
    done: list[tuple[Path, bool]] = []
    try:
        for relative in written:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            replaced = destination.is_file()
            if replaced:
                _keep_copy(destination, backup / relative)
            done.append((relative, replaced))
            os.replace(staging / relative, destination)
        new_names = {relative.as_posix() for relative in written}
        for path in sorted(target.iterdir()):
            if path.is_file() and stale(path.name) and path.name not in new_names:
                done.append((Path(path.name), True))
                os.replace(path, backup / path.name)
    except BaseException:
        # A step is recorded before it runs, so the interrupted step may not have happened yet.
        for relative, replaced in reversed(done):
            destination = target / relative
            if not replaced:
                destination.unlink(missing_ok=True)
            elif (backup / relative).is_file():
                os.replace(backup / relative, destination)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


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
    _remove_abandoned_staging(target)
    staging = _make_staging(target)
    try:
        try:
            write(staging)
        except BaseException:
            # A folder this call created is removed again, unless something else wrote into it meanwhile.
            if created and not any(path != staging for path in target.iterdir()):
                shutil.rmtree(target, ignore_errors=True)
            raise
        written = sorted(path.relative_to(staging) for path in staging.rglob("*") if path.is_file())
        _commit(staging, target, written, stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
