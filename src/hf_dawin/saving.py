"""Atomic folder saves: files are written into a staging folder beside the target, then moved into place.

An interrupted write (an error, a full disk, Ctrl-C) leaves the target folder as it was, because nothing reaches
it until every file is complete. Each file then replaces its previous version with `os.replace`, which is atomic
on one filesystem. NOTE: the folder as a whole is not swapped atomically, so an interruption during these moves
(renames, which take milliseconds) can leave some files new and others old. A process killed outright leaves its
staging folder behind; the next save into the same target removes it. This module uses the standard library
only, because it is copied beside saved models as remote code.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


__all__ = ["is_weight_file", "move_into_place", "pop_push_arguments", "remove_abandoned_folders", "save_atomically"]

# Staging folders are named ".<target>.saving-<process id>-<random>", beside the target.
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
    """Remove staging folders of earlier saves into `target` whose process no longer exists."""
    remove_abandoned_folders(target.parent, f".{target.name}{_STAGING_MARK}")


def move_into_place(temporary: Path, path: Path) -> None:
    """Move a finished temporary file onto `path`, with the mode an ordinary new file gets under the umask.

    `tempfile.NamedTemporaryFile` creates files readable by their owner only, but results and figures are meant
    to be shared, so the file first gets 0644 under the usual umask 022.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)


def save_atomically(save_directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(staging)` on an empty staging folder, then move what it wrote into `save_directory`.

    If `write` raises, the target is left as it was, and a target folder that this call created is removed.
    Files of the target that `write` did not produce are kept, except weight files of an earlier save
    (`model*.safetensors` and their index), which would otherwise mix shards of two saves. The staging folder is
    created beside the target, on the same filesystem, and is removed in every case.

    Args:
        save_directory (`str` or `os.PathLike`): The folder to save into, created if missing.
        write (`Callable[[Path], None]`): Writes the files, for example `lambda folder: model.save_pretrained(folder)`.

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
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING_MARK}{os.getpid()}-", dir=target.parent))
    try:
        try:
            write(staging)
        except BaseException:
            # A folder this call created is removed again, unless something else wrote into it meanwhile.
            if created and not any(target.iterdir()):
                target.rmdir()
            raise
        written = sorted(path.relative_to(staging) for path in staging.rglob("*") if path.is_file())
        for relative in written:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, destination)
        new_names = {relative.as_posix() for relative in written}
        for path in target.iterdir():
            if path.is_file() and is_weight_file(path.name) and path.name not in new_names:
                path.unlink()
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
