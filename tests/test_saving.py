"""Atomic saves: an interrupted save leaves the previous files intact and no staging folder behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_dawin import DaWinCLIPConfig, DaWinCLIPModel
from hf_dawin import saving
from hf_dawin.loading import recover_local_folder
from hf_dawin.saving import pop_push_arguments, save_atomically


def _snapshot(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_files_move_into_place(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    (target / "config.json").write_text("old")

    def write(folder):
        (folder / "config.json").write_text("new")
        (folder / "sub").mkdir()
        (folder / "sub" / "file.txt").write_text("nested")

    save_atomically(target, write)

    assert _snapshot(target) == {"keep.txt": b"old", "config.json": b"new", "sub/file.txt": b"nested"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_failed_write_leaves_target_unchanged(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"previous weights")

    def write(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomically(target, write)

    assert _snapshot(target) == {"model.safetensors": b"previous weights"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_stale_weight_shards_removed(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "README.md"):
        (target / name).write_text("old")

    save_atomically(target, lambda folder: (folder / "model.safetensors").write_text("new"))

    assert _snapshot(target) == {"model.safetensors": b"new", "README.md": b"old"}


@pytest.mark.parametrize(
    ("failing_move", "moved_file"),
    [(1, "config.json"), (2, "model.safetensors"), (3, "model-00001-of-00002.safetensors")],
)
def test_interrupted_moves_put_previous_files_back(tmp_path, monkeypatch, failing_move, moved_file):
    target = tmp_path / "out"
    target.mkdir()
    for name, text in (("config.json", "old config"), ("model-00001-of-00002.safetensors", "old shard"),
                       ("model.safetensors.index.json", "old index"), ("README.md", "kept")):
        (target / name).write_text(text)
    before = _snapshot(target)
    calls = []
    replace = os.replace

    def interrupt(source, destination):
        calls.append(destination)
        if len(calls) == failing_move:
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(saving.os, "replace", interrupt)

    def write(folder):
        (folder / "config.json").write_text("new config")
        (folder / "model.safetensors").write_text("new weights")

    with pytest.raises(KeyboardInterrupt):
        save_atomically(target, write)

    # Moves 1 and 2 bring in the new files. Move 3 takes away a stale shard.
    assert Path(calls[failing_move - 1]).name == moved_file
    assert _snapshot(target) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_staging_inside_unwritable_parent(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")
    make_folder = saving.tempfile.mkdtemp
    staging_parents = []

    def parent_not_writable(prefix=None, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied", str(dir))
        staging_parents.append(Path(dir))
        return make_folder(prefix=prefix, dir=dir, **kwargs)

    monkeypatch.setattr(saving.tempfile, "mkdtemp", parent_not_writable)
    save_atomically(target, lambda folder: (folder / "config.json").write_text("new"))

    assert staging_parents and set(staging_parents) == {target}
    assert _snapshot(target) == {"config.json": b"new"}
    assert [path.name for path in target.iterdir()] == ["config.json"]


def test_file_target_rejected(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")

    with pytest.raises(NotADirectoryError, match="it is a file"):
        save_atomically(path, lambda folder: None)


def test_push_arguments_split_from_save_arguments(tmp_path):
    kwargs = {"push_to_hub": True, "commit_message": "m", "max_shard_size": "1GB"}

    push = pop_push_arguments(tmp_path / "my-model", kwargs)

    assert push == {"commit_message": "m", "repo_id": "my-model"}
    assert kwargs == {"max_shard_size": "1GB"}
    assert pop_push_arguments(tmp_path, {"token": "t"}) is None


def test_interrupted_model_save_keeps_previous(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "model")
    before = _snapshot(tmp_path / "model")
    import transformers.modeling_utils

    def fail_midway(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail_midway)
    with torch.no_grad():
        tiny_model.zero_shot_head.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        tiny_model.save_pretrained(tmp_path / "model")

    assert _snapshot(tmp_path / "model") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
    assert isinstance(DaWinCLIPModel.from_pretrained(tmp_path / "model"), DaWinCLIPModel)


def test_failed_save_removes_new_folder(tmp_path):
    target = tmp_path / "new" / "model"

    def write(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(target, write)

    assert not target.exists()
    assert [path.name for path in (tmp_path / "new").iterdir()] == []


@pytest.mark.skipif(saving.fcntl is None, reason="saves are locked with fcntl")
def test_abandoned_work_folders_removed(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    old_lockless = tmp_path / ".model.saving-123-abc"
    new_lockless = tmp_path / ".model.saving-123-def"
    other_target = tmp_path / ".other.saving-123-ghi"
    for folder in (old_lockless, new_lockless, other_target):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    an_hour_ago = time.time() - 3600
    os.utime(old_lockless, (an_hour_ago, an_hour_ago))
    os.utime(other_target, (an_hour_ago, an_hour_ago))
    released = saving._make_work_folder(target)
    os.close(saving._lock_work_folder(released))
    in_use = saving._make_work_folder(target)
    descriptor = saving._lock_work_folder(in_use)

    save_atomically(target, lambda folder: (folder / "config.json").write_text("{}"))
    os.close(descriptor)

    assert not old_lockless.exists()
    assert not released.exists()
    assert new_lockless.is_dir()
    assert in_use.is_dir()
    assert other_target.is_dir()
    assert [path.name for path in target.iterdir()] == ["config.json"]


# A save run in a child process that kills itself (SIGKILL, no clean-up) at its Nth call of os.replace, or, with
# N = 0, when it removes its work folder after the last move.
_KILLED_SAVE = """
import os, shutil, signal, sys
from hf_dawin import saving

target, kill_at = sys.argv[1], int(sys.argv[2])
calls = []
replace = os.replace

def replace_or_die(source, destination):
    calls.append(destination)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(source, destination)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

saving.os.replace = replace_or_die
if kill_at == 0:
    saving.shutil.rmtree = die

def write(folder):
    (folder / "config.json").write_text("new config")
    (folder / "model.safetensors").write_text("new weights")

saving.save_atomically(target, write)
"""


def _run_killed_save(target, kill_at):
    finished = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(target), str(kill_at)], capture_output=True)
    assert finished.returncode == -9, finished.stderr.decode()


# A save that copies the files of `source` into `target` and kills itself (SIGKILL) at its Nth call of os.replace.
_KILLED_COPY_SAVE = """
import os, shutil, signal, sys
from hf_dawin import saving

source, target, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
replace, calls = os.replace, []

def replace_or_die(origin, destination):
    calls.append(destination)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(origin, destination)

saving.os.replace = replace_or_die
saving.save_atomically(target, lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True))
"""


def _run_killed_save_of(source, target, kill_at):
    command = [sys.executable, "-c", _KILLED_COPY_SAVE, str(source), str(target), str(kill_at)]
    finished = subprocess.run(command, capture_output=True)
    assert finished.returncode == -9, finished.stderr.decode()


def _previous_save(target):
    target.mkdir(parents=True)
    for name, text in (("config.json", "old config"), ("model-00001-of-00002.safetensors", "old shard"),
                       ("model.safetensors.index.json", "old index"), ("README.md", "kept")):
        (target / name).write_text(text)
    return _snapshot(target)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the synced paths from /proc/self/fd")
def test_files_synced_before_moves(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _previous_save(target)
    events = []
    fsync, replace, unlink = os.fsync, os.replace, os.unlink

    def record_fsync(descriptor):
        events.append(("sync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def record_replace(source, destination):
        events.append(("replace", str(destination)))
        replace(source, destination)

    def record_unlink(path, *args, **kwargs):
        events.append(("unlink", str(path)))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    monkeypatch.setattr(os, "unlink", record_unlink)

    def write(folder):
        (folder / "config.json").write_text("new config")
        (folder / "model.safetensors").write_text("new weights")

    save_atomically(target, write)

    moves = [index for index, (kind, path) in enumerate(events) if kind == "replace"]
    synced = [(index, path) for index, (kind, path) in enumerate(events) if kind == "sync"]
    removals = [index for index, (kind, path) in enumerate(events) if kind == "unlink" and path.endswith("journal.json")]
    journal_removed = removals[0]

    # Before the first move: the staged files' data and the journal.
    for suffix in ("/staged/config.json", "/staged/model.safetensors", "/journal.json"):
        assert any(index < moves[0] and path.endswith(suffix) for index, path in synced), suffix
    # The hard link that keeps the replaced config.json is on disk before config.json is replaced.
    config_move = next(index for index in moves if events[index][1] == str(target.resolve() / "config.json"))
    assert any(index < config_move and path.endswith("/previous") for index, path in synced)
    # The target folder's new entries are on disk before the journal that would undo them goes.
    assert any(moves[-1] < index < journal_removed and path == str(target.resolve()) for index, path in synced)


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_killed_save_rolled_back(tmp_path, kill_at):
    target = tmp_path / "out"
    before = _previous_save(target)

    _run_killed_save(target, kill_at)
    if kill_at > 1:
        assert _snapshot(target) != before

    assert saving.recover_interrupted_save(target) is True
    assert _snapshot(target) == before
    assert saving.recover_interrupted_save(target) is False
    save_atomically(target, lambda folder: (folder / "config.json").write_text("next config"))
    assert _snapshot(target) == {"config.json": b"next config", "README.md": b"kept"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
def test_save_killed_after_last_move_kept(tmp_path):
    target = tmp_path / "out"
    _previous_save(target)

    _run_killed_save(target, 0)

    assert saving.recover_interrupted_save(target) is False
    expected = {"config.json": b"new config", "model.safetensors": b"new weights", "README.md": b"kept"}
    assert _snapshot(target) == expected
    save_atomically(target, lambda folder: (folder / "config.json").write_text("next config"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


# A save run in a child process that sends itself a signal at its first call of os.replace (during the moves) or
# while it writes its files (before the moves).
_SIGNALLED_SAVE = """
import os, signal, sys
from hf_dawin import saving

target, signal_name, when = sys.argv[1], sys.argv[2], sys.argv[3]
number = getattr(signal, signal_name)
# A launcher such as nohup passes SIGHUP on as ignored, and the save leaves ignored signals alone.
signal.signal(number, signal.SIG_DFL)
replace = os.replace

def replace_after_signal(source, destination):
    os.kill(os.getpid(), number)
    replace(source, destination)

def write(folder):
    (folder / "config.json").write_text("new config")
    if when == "write":
        os.kill(os.getpid(), number)
    (folder / "model.safetensors").write_text("new weights")

if when == "moves":
    saving.os.replace = replace_after_signal
saving.save_atomically(target, write)
print("save returned")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="the test sends POSIX signals")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_termination_waits_for_moves(tmp_path, signal_name):
    target = tmp_path / "out"
    _previous_save(target)

    command = [sys.executable, "-c", _SIGNALLED_SAVE, str(target), signal_name, "moves"]
    finished = subprocess.run(command, capture_output=True, text=True)

    assert finished.returncode == -getattr(signal, signal_name), finished.stderr
    assert "save returned" not in finished.stdout
    assert f"{signal_name} arrived while a save moved its files in" in finished.stderr
    expected = {"config.json": b"new config", "model.safetensors": b"new weights", "README.md": b"kept"}
    assert _snapshot(target) == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(os.name != "posix", reason="the test sends POSIX signals")
def test_termination_during_write_immediate(tmp_path):
    target = tmp_path / "out"
    before = _previous_save(target)

    command = [sys.executable, "-c", _SIGNALLED_SAVE, str(target), "SIGTERM", "write"]
    finished = subprocess.run(command, capture_output=True, text=True)

    assert finished.returncode == -signal.SIGTERM, finished.stderr
    assert "arrived while a save" not in finished.stderr
    assert _snapshot(target) == before
    assert saving.recover_interrupted_save(target) is False
    assert _snapshot(target) == before


def test_termination_handlers_restored(tmp_path):
    handlers = {number: signal.getsignal(number) for number in saving._DEFERRED_SIGNALS}
    save_atomically(tmp_path / "out", lambda folder: (folder / "config.json").write_text("config"))
    assert {number: signal.getsignal(number) for number in saving._DEFERRED_SIGNALS} == handlers


@pytest.mark.skipif(saving.fcntl is None, reason="saves are locked with fcntl")
def test_locked_save_not_rolled_back(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("new config")
    work = saving._make_work_folder(target)
    descriptor = saving._lock_work_folder(work)
    (work / "previous").mkdir()
    (work / "previous" / "config.json").write_text("old config")
    (work / "journal.json").write_text('{"format": 1, "steps": [{"path": "config.json", "replaced": true}]}')

    assert saving.recover_interrupted_save(target) is False
    assert (target / "config.json").read_text() == "new config"

    # The lock goes with the save, not with the process id, which stays alive here as a reused id would.
    os.close(descriptor)
    assert saving.recover_interrupted_save(target) is True
    assert (target / "config.json").read_text() == "old config"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(saving.fcntl is None, reason="saves are locked with fcntl")
def test_older_layout_journal_restored(tmp_path):
    # An older layout kept the journal and the replaced files at the root of a "-previous-" folder, with no lock.
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("new config")
    (target / "a.txt").write_text("new file")
    backup = tmp_path / ".out.saving-123-abc-previous-def"
    backup.mkdir()
    (backup / "config.json").write_text("old config")
    steps = '[{"path": "a.txt", "replaced": false}, {"path": "config.json", "replaced": true}]'
    (backup / "journal.json").write_text(f'{{"format": 1, "steps": {steps}}}')
    an_hour_ago = time.time() - 3600
    os.utime(backup, (an_hour_ago, an_hour_ago))

    assert saving.recover_interrupted_save(target) is True

    assert _snapshot(target) == {"config.json": b"old config"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_partial_copy_never_restored(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"previous weights")

    def no_hard_links(source, destination):
        raise PermissionError(1, "Operation not permitted")

    def copy_cut_short(source, destination):
        Path(destination).write_bytes(b"prev")
        raise KeyboardInterrupt

    monkeypatch.setattr(saving.os, "link", no_hard_links)
    monkeypatch.setattr(saving.shutil, "copy2", copy_cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_atomically(target, lambda folder: (folder / "model.safetensors").write_bytes(b"new weights"))

    assert _snapshot(target) == {"model.safetensors": b"previous weights"}


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
def test_killed_save_in_subfolder_restored(tmp_path):
    target = tmp_path / "root" / "sub"
    before = _previous_save(target)
    _run_killed_save(target, 3)
    assert _snapshot(target) != before

    recover_local_folder(tmp_path / "root", {"subfolder": "sub"})

    assert _snapshot(target) == before


# Saves a changed copy of a saved model over it, dying at the first move after `die_after` is in place. With class
# names, the copy is relabelled. Without, its zero-shot head changes.
_KILLED_MODEL_SAVE = """
import os, signal, sys
import torch
from hf_dawin import DaWinCLIPModel, saving

folder, die_after, class_names = sys.argv[1], sys.argv[2], sys.argv[3:]
if class_names:
    model = DaWinCLIPModel.from_pretrained(folder, class_names=class_names, mode="static", alpha=0.2)
else:
    model = DaWinCLIPModel.from_pretrained(folder)
    with torch.no_grad():
        model.zero_shot_head.weight.add_(1.0)
replace = os.replace
moved = []

def replace_or_die(source, destination):
    if die_after in moved:
        os.kill(os.getpid(), signal.SIGKILL)
    moved.append(os.path.basename(destination))
    replace(source, destination)

saving.os.replace = replace_or_die
model.save_pretrained(folder)
"""


def _run_killed_model_save(folder, die_after, class_names=()):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", _KILLED_MODEL_SAVE, str(folder), die_after, *class_names]
    finished = subprocess.run(command, capture_output=True, env=environment)
    assert finished.returncode == -9, finished.stderr.decode()


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
def test_killed_model_save_restored_on_load(tiny_model, tmp_path, pixel_values, caplog):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    before = _snapshot(folder)

    _run_killed_model_save(folder, "model.safetensors")

    assert _snapshot(folder) != before
    with caplog.at_level("WARNING", logger="hf_dawin.saving"):
        loaded = DaWinCLIPModel.from_pretrained(folder)
    assert "was killed" in caplog.text
    assert _snapshot(folder) == before
    with torch.no_grad():
        expected = tiny_model(pixel_values, mode="zero_shot").logits
        torch.testing.assert_close(loaded(pixel_values, mode="zero_shot").logits, expected)


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
def test_restored_config_of_other_type_asks_reload(tiny_model, tmp_path):
    from transformers import AutoModelForImageClassification

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    before = _snapshot(folder)
    # A save of another model type, killed (SIGKILL) at its second move, after config.json moved in.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "dawin_multitask_clip"}))
    _run_killed_save_of(tmp_path / "other", folder, kill_at=2)
    assert "dawin_multitask_clip" in (folder / "config.json").read_text()

    with pytest.raises(OSError, match="of model type 'dawin_clip', not 'dawin_multitask_clip': load the model again"):
        AutoModelForImageClassification.from_pretrained(folder)
    assert _snapshot(folder) == before
    assert isinstance(AutoModelForImageClassification.from_pretrained(folder), DaWinCLIPModel)


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
def test_killed_first_save_auto_load_explained(tiny_model, tmp_path, caplog):
    from transformers import AutoModelForImageClassification

    tiny_model.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "new"
    # Killed at the move after config.json's, so config.json is in place.
    names = sorted(path.name for path in (tmp_path / "saved").iterdir())
    _run_killed_save_of(tmp_path / "saved", folder, kill_at=names.index("config.json") + 2)
    assert (folder / "config.json").is_file()

    with caplog.at_level("WARNING", logger="hf_dawin.saving"):
        with pytest.raises(OSError, match="It was the first save into that folder, so its files have been removed"):
            AutoModelForImageClassification.from_pretrained(folder)
    assert "It replaced no files, so the files it had moved in have been removed" in caplog.text
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
def test_config_read_before_recovery_rejected(tiny_model, tmp_path):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    before = _snapshot(folder)
    _run_killed_model_save(folder, "config.json", ["w", "x", "y", "z"])

    # A config read from the half-replaced folder without hf_dawin's recovery, then passed to the model class.
    config = DaWinCLIPConfig(**json.loads((folder / "config.json").read_text()))
    with pytest.raises(OSError, match="The previous files have been put back: load the config and the model again"):
        recover_local_folder(folder, {"config": config})
    assert _snapshot(folder) == before


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
@pytest.mark.parametrize("loader", ["auto", "pipeline"])
# The killed save was in mode "static" with alpha 0.2: arguments equal to its values must be kept too.
@pytest.mark.parametrize("arguments", [{"mode": "zero_shot"}, {"mode": "static", "alpha": 0.2}])
def test_killed_save_restored_before_auto_config(tiny_model, tmp_path, loader, arguments):
    from transformers import AutoModelForImageClassification, pipeline

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    previous_names = list(tiny_model.config.class_names)
    new_names = [f"new {name}" for name in previous_names]
    before = _snapshot(folder)

    _run_killed_model_save(folder, "config.json", new_names)

    assert "new " in (folder / "config.json").read_text()

    # The Auto classes read the killed save's config.json first. hf_dawin puts the previous files back while the
    # config is built, reads config.json again, and applies the keyword arguments to it.
    if loader == "auto":
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16, **arguments)
        assert list(model.config.id2label.values()) == previous_names
    else:
        classifier = pipeline("image-classification", model=str(folder), dtype=torch.bfloat16, model_kwargs=arguments)
        model = classifier.model
        image = Image.new("RGB", (40, 40), "white")
        labels = [result["label"] for result in classifier(image, top_k=len(previous_names))]
        assert sorted(labels) == sorted(previous_names)
    assert model.config.class_names == previous_names
    for name, value in arguments.items():
        assert getattr(model.config, name) == value
    assert model.zero_shot.dtype == torch.bfloat16
    assert _snapshot(folder) == before
