"""`hf-dawin push-results`: a saved results.json reaches a model card as a push at evaluation time would.

The uploads run the real `huggingface_hub` code against the loopback `FakeHub` of `test_hub`.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard, constants

from hf_dawin import DaWinMultiTaskCLIPModel
from hf_dawin.cli import main
from hf_dawin.push_results import load_saved_results, push_saved_results, retry_command

from .conftest import TINY_CLASS_NAMES, make_clip
from .test_evaluation_multitask import save_image_dataset
from .test_hub import fake_hub  # noqa: F401 - the loopback Hub fixture


def card_of(hub, repo_id) -> ModelCard:
    return ModelCard(hub.repos[repo_id]["README.md"].decode())


def model_index(card):
    return {(result.dataset_name, result.metric_type): result.metric_value for result in card.data.eval_results or []}


@pytest.fixture(scope="module")
def pair_results_dir(tiny_pair_dirs, tmp_path_factory):
    """The output folder of a finished `hf-dawin evaluate` run on two small saved datasets."""
    root = tmp_path_factory.mktemp("pair_results")
    save_image_dataset(root / "pets", list(TINY_CLASS_NAMES), 8, seed=0)
    save_image_dataset(root / "sketch", list(TINY_CLASS_NAMES), 8, seed=1)
    status = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(root / "pets"), "--shift-dataset", f"sketch={root / 'sketch'}", "--alphas", "0,1",
        "--output-dir", str(root / "out"), "--no-progress", "--no-plots",
    ])  # fmt: skip
    assert status == 0
    return root / "out"


@pytest.fixture(scope="module")
def multitask_endpoint_dirs(tmp_path_factory, tiny_processor):
    root = tmp_path_factory.mktemp("multitask_endpoints")
    pretrained = make_clip(0)
    paths = []
    for name, model in [("pretrained", pretrained), *((f"task{i}", make_clip(40 + i, base=pretrained, noise=0.3)) for i in range(2))]:
        model.save_pretrained(root / name)
        tiny_processor.save_pretrained(root / name)
        paths.append(root / name)
    save_image_dataset(root / "animals", list(TINY_CLASS_NAMES), 6, seed=2)
    save_image_dataset(root / "colours", ["red", "green", "blue"], 6, seed=3)
    return root, paths


def multitask_argv(endpoints, output_dir):
    root, (pretrained, *fine_tuned) = endpoints
    return [
        "evaluate-multitask", "--pretrained", str(pretrained), "--fine-tuned", str(fine_tuned[0]), "--fine-tuned",
        str(fine_tuned[1]), "--task-dataset", f"animals={root / 'animals'}", "--task-dataset",
        f"colours={root / 'colours'}", "--no-ties", "--no-progress", "--no-plots", "--output-dir", str(output_dir),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The same card as a push at evaluation time
# ----------------------------------------------------------------------------------------------------------


def test_pair_card_matches_direct_push(fake_hub, tiny_pair_dirs, tmp_path, capsys):
    # One run pushes at evaluation time. Its saved results are then pushed to another organisation.
    root = tmp_path
    save_image_dataset(root / "pets", list(TINY_CLASS_NAMES), 8, seed=0)
    save_image_dataset(root / "sketch", list(TINY_CLASS_NAMES), 8, seed=1)
    status = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(root / "pets"), "--shift-dataset", f"sketch={root / 'sketch'}", "--alphas", "0,1",
        "--output-dir", str(root / "out"), "--no-progress", "--no-plots", "--push-results", "org-a/evaluated",
    ])  # fmt: skip
    assert status == 0

    status = main(["push-results", "org-b/evaluated", "--results-dir", str(root / "out")])

    assert status == 0
    assert "Results written into the model card of org-b/evaluated" in capsys.readouterr().out
    direct = fake_hub.repos["org-a/evaluated"]["README.md"].decode()
    saved = fake_hub.repos["org-b/evaluated"]["README.md"].decode()
    assert saved == direct.replace("org-a/", "org-b/")
    written = json.loads((root / "out" / "results.json").read_text())
    entries = model_index(ModelCard(saved))
    assert entries[("sketch", "accuracy")] == pytest.approx(written["sets"]["sketch"]["scores"]["dawin_sample"]["accuracy"])


def test_multitask_card_matches_direct_push(fake_hub, multitask_endpoint_dirs, tmp_path):
    output_dir = tmp_path / "out"
    assert main([*multitask_argv(multitask_endpoint_dirs, output_dir), "--push-results", "org-a/multi"]) == 0

    assert main(["push-results", "org-b/multi", "--results-dir", str(output_dir / "results.json")]) == 0

    direct = fake_hub.repos["org-a/multi"]["README.md"].decode()
    saved = fake_hub.repos["org-b/multi"]["README.md"].decode()
    assert saved == direct.replace("org-a/", "org-b/")
    assert ("animals", "accuracy") in model_index(ModelCard(saved))


def test_method_and_alpha_select_scores(fake_hub, pair_results_dir):
    written = json.loads((pair_results_dir / "results.json").read_text())

    push_saved_results("my-org/mixture", pair_results_dir, method="dawin_mixture")
    push_saved_results("my-org/static", pair_results_dir, alpha=1.0)

    mixture = model_index(card_of(fake_hub, "my-org/mixture"))
    assert mixture[("pets", "accuracy")] == pytest.approx(written["sets"]["pets"]["scores"]["dawin_mixture"]["accuracy"])
    static = model_index(card_of(fake_hub, "my-org/static"))
    alpha_one = written["wise_ft_sweep"]["alphas"].index(1.0)
    assert static[("sketch", "accuracy")] == pytest.approx(written["wise_ft_sweep"]["accuracy"]["sketch"][alpha_one])
    assert ("sketch", "f1") not in static


def test_create_pr_prints_pull_request(fake_hub, pair_results_dir, capsys):
    status = main(["push-results", "my-org/evaluated", "--results-dir", str(pair_results_dir), "--create-pr"])

    assert status == 0
    printed = capsys.readouterr().out
    assert "Pull request with the results opened on my-org/evaluated: " in printed
    assert "create_pr=1" in fake_hub.commits[-1]["query"]


def test_rejects_card_of_other_model_kind(fake_hub, multitask_endpoint_dirs, pair_results_dir, tiny_processor, capsys):
    _, (pretrained, *fine_tuned) = multitask_endpoint_dirs
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, fine_tuned, tasks={"animals": list(TINY_CLASS_NAMES)}, processor=tiny_processor
    )
    model.push_to_hub("my-org/multi")
    card_before = fake_hub.repos["my-org/multi"]["README.md"]

    status = main(["push-results", "my-org/multi", "--results-dir", str(pair_results_dir)])

    assert status == 1
    error = capsys.readouterr().err
    assert "describes a multi-task DaWin model, but the results are from a pair (distribution-shift)" in error
    assert len(fake_hub.commits) == 1
    assert fake_hub.repos["my-org/multi"]["README.md"] == card_before


# ----------------------------------------------------------------------------------------------------------
# The retry command of a failed push
# ----------------------------------------------------------------------------------------------------------


def test_failed_push_prints_working_command(fake_hub, multitask_endpoint_dirs, tmp_path, capsys, monkeypatch):
    endpoint = constants.ENDPOINT
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint)
    output_dir = tmp_path / "multi results"

    status = main([*multitask_argv(multitask_endpoint_dirs, output_dir), "--push-results", "my-org/multi"])

    assert status == 1
    error = capsys.readouterr().err
    command = retry_command("my-org/multi", output_dir)
    assert f"then push them with `{command}`." in error
    assert not fake_hub.commits

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    argv = shlex.split(command)
    assert argv[0] == "hf-dawin"
    assert main(argv[1:]) == 0
    assert len(fake_hub.commits) == 1
    assert ("colours", "accuracy") in model_index(card_of(fake_hub, "my-org/multi"))


def test_retry_command_flags():
    assert retry_command("a/b", "out") == "hf-dawin push-results a/b --results-dir out"
    assert retry_command("a/b", "out", method="dawin_mixture").endswith("--results-dir out --method dawin_mixture")
    assert retry_command("a/b", "out", alpha=0.5).endswith("--results-dir out --alpha 0.5")


# ----------------------------------------------------------------------------------------------------------
# Bad input: reported before anything is sent
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "no_such_method"], "has no scores for method 'no_such_method'. Its methods are ["),
        (["--alpha", "0.3"], "do not include the model's static alpha 0.3"),
        (["--method", "oracle"], "reads each image's label, so its scores are not results of a model"),
    ],
)
def test_pair_rejects_unknown_scores(fake_hub, pair_results_dir, capsys, extra, message):
    status = main(["push-results", "my-org/x", "--results-dir", str(pair_results_dir), *extra])

    assert status == 1
    assert message in capsys.readouterr().err
    assert fake_hub.requests == []


def test_multitask_rejects_alpha(fake_hub, multitask_endpoint_dirs, tmp_path, capsys):
    assert main(multitask_argv(multitask_endpoint_dirs, tmp_path / "out")) == 0

    status = main(["push-results", "my-org/x", "--results-dir", str(tmp_path / "out"), "--alpha", "0.5"])

    assert status == 1
    assert "these are multi-task results; pass --method instead, one of [" in capsys.readouterr().err
    assert fake_hub.requests == []


def test_missing_and_foreign_results(fake_hub, tmp_path, capsys):
    assert main(["push-results", "my-org/x", "--results-dir", str(tmp_path / "nowhere")]) == 1
    assert f"No evaluation results at {tmp_path / 'nowhere'}. Pass the --output-dir" in capsys.readouterr().err

    (tmp_path / "results.json").write_text("{not json")
    assert main(["push-results", "my-org/x", "--results-dir", str(tmp_path)]) == 1
    assert "is not a JSON file" in capsys.readouterr().err

    (tmp_path / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(ValueError, match=r"does not contain evaluate results: .* found \['accuracy'\]"):
        load_saved_results(tmp_path)
    assert fake_hub.requests == []


# A save of new output files into an evaluate run's folder, killed (SIGKILL) at its second move: results.json is
# then new and results.md still old.
_KILLED_RESULTS_SAVE = """
import os, signal, sys
from hf_dawin import saving

replace, calls = os.replace, []

def replace_or_die(source, destination):
    calls.append(destination)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(source, destination)

def write(folder):
    (folder / "results.json").write_text('{"interrupted": true}')
    (folder / "results.md").write_text("interrupted")

saving.os.replace = replace_or_die
saving.save_atomically(sys.argv[1], write)
"""


@pytest.mark.skipif(os.name != "posix", reason="the test kills a process with SIGKILL")
def test_killed_output_save_restored(pair_results_dir, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(pair_results_dir, output_dir)
    expected = json.loads((pair_results_dir / "results.json").read_text())

    finished = subprocess.run([sys.executable, "-c", _KILLED_RESULTS_SAVE, str(output_dir)], capture_output=True)
    assert finished.returncode == -signal.SIGKILL, finished.stderr.decode()
    assert json.loads((output_dir / "results.json").read_text()) == {"interrupted": True}

    results, kind = load_saved_results(output_dir)
    assert kind == "pair"
    assert results == expected
    assert (output_dir / "results.md").read_text() == (pair_results_dir / "results.md").read_text()


def test_offline_mode_fails_first(tmp_path):
    with pytest.raises(SystemExit, match="offline mode is on"):
        main(["push-results", "my-org/x", "--results-dir", str(tmp_path)])


def test_method_excludes_alpha(pair_results_dir):
    with pytest.raises(SystemExit):
        main(["push-results", "my-org/x", "--results-dir", str(pair_results_dir), "--method", "zero_shot", "--alpha", "0"])
    with pytest.raises(ValueError, match="not both"):
        push_saved_results("my-org/x", pair_results_dir, method="zero_shot", alpha=0.0)
