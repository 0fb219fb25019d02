"""`hf-dawin push-results`: write a saved evaluation into a Hub repository's model card.

`hf-dawin evaluate --push-results REPO` pushes right after the run. This command pushes a `results.json` that
an earlier run wrote, so a failed upload (no connection, a missing token) does not mean evaluating again.
It reads both kinds of results: the shift evaluation of a pair and the multi-task evaluation.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import is_offline_mode
from transformers.utils import logging

from .cli import one_line
from .saving import recover_interrupted_save


logger = logging.get_logger(__name__)

__all__ = ["check_reported", "load_saved_results", "main_push_results", "push_saved_results", "retry_command"]

RESULTS_FILE = "results.json"
DEFAULT_METHOD = "dawin_sample"


def _results_kind(results: Mapping) -> str | None:
    """Return `"pair"` or `"multitask"` for the results of the two evaluate commands, else None."""
    if "sets" in results and "wise_ft_sweep" in results:
        return "pair"
    if "tasks" in results and "methods" in results:
        return "multitask"
    return None


def load_saved_results(path: str | Path) -> tuple[dict, str]:
    """Read the `results.json` written by `hf-dawin evaluate` or `hf-dawin evaluate-multitask`.

    Args:
        path (`str` or `Path`): The results file, or the output folder that contains it.

    Returns:
        `tuple[dict, str]`: The results and their kind, `"pair"` or `"multitask"`.

    Raises:
        FileNotFoundError: If there is no results file at `path`.
        ValueError: If the file is not JSON, or not the results of either evaluate command.
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    # A run killed while it moved its output files in leaves a mix of two runs' files until they are put back.
    recover_interrupted_save(file.parent)
    if not file.is_file():
        raise FileNotFoundError(
            f"No evaluation results at {file}. Pass the --output-dir of an `hf-dawin evaluate` or "
            f"`hf-dawin evaluate-multitask` run, or its {RESULTS_FILE}."
        )
    try:
        results = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not a JSON file ({error}); pass the {RESULTS_FILE} an evaluate run wrote.") from None
    kind = _results_kind(results) if isinstance(results, dict) else None
    if kind is None:
        found = sorted(results) if isinstance(results, dict) else type(results).__name__
        raise ValueError(
            f"{file} does not contain evaluate results: expected the keys 'sets' and 'wise_ft_sweep' (hf-dawin "
            f"evaluate) or 'tasks' and 'methods' (hf-dawin evaluate-multitask), found {found}."
        )
    return results, kind


def retry_command(repo_id: str, output_dir: str | Path, *, method: str | None = None, alpha: float | None = None) -> str:
    """Return the `hf-dawin push-results` command that pushes the results in `output_dir` to `repo_id`.

    Args:
        repo_id (`str`): Repository whose card receives the results.
        output_dir (`str` or `Path`): Folder that contains `results.json`.
        method (`str`, *optional*): Method to report; omitted from the command when it is the default.
        alpha (`float`, *optional*): WiSE-FT alpha to report instead of a method (a model in `static` mode).
    """
    command = f"hf-dawin push-results {shlex.quote(repo_id)} --results-dir {shlex.quote(str(output_dir))}"
    if alpha is not None:
        return f"{command} --alpha {alpha:g}"
    if method is not None and method != DEFAULT_METHOD:
        return f"{command} --method {method}"
    return command


def check_reported(
    results: Mapping, kind: str, *, method: str | None = None, alpha: float | None = None
) -> tuple[str | None, float | None]:
    """Check that saved results have scores for what a card should report, before anything is sent.

    Args:
        results (`Mapping`): Results read by [`load_saved_results`].
        kind (`str`): `"pair"` or `"multitask"`.
        method (`str`, *optional*): Method to report; defaults to `"dawin_sample"` unless `alpha` is given.
        alpha (`float`, *optional*): WiSE-FT alpha to report instead of a method (pair results only).

    Returns:
        `tuple[str | None, float | None]`: The method and alpha to pass to the push functions.

    Raises:
        ValueError: If both are given, if `alpha` is given for multi-task results, or if the results have no
            scores for them.
    """
    if method is not None and alpha is not None:
        raise ValueError(f"Pass a method or a WiSE-FT alpha, not both; received method {method!r} and alpha {alpha}.")
    if kind == "multitask":
        from .hub_multitask import multitask_eval_results

        if alpha is not None:
            raise ValueError(
                f"An alpha ({alpha}) selects a point of the WiSE-FT sweep of a pair evaluation, but these are "
                f"multi-task results; pass --method instead, one of {list(results['methods'])}."
            )
        method = method or DEFAULT_METHOD
        multitask_eval_results(results, method)
        return method, None

    from .hub import eval_results_from

    method = None if alpha is not None else (method or DEFAULT_METHOD)
    eval_results_from(results, method=method, static_alpha=alpha)
    return method, alpha


def push_saved_results(
    repo_id: str,
    path: str | Path,
    *,
    method: str | None = None,
    alpha: float | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Write a saved evaluation into a Hub repository's model card and upload it in one commit.

    The method is checked against the results before anything is sent. The card is updated as
    `hf-dawin evaluate --push-results` would: its results section and `model-index` entries are replaced.

    Args:
        repo_id (`str`): Repository whose card receives the results; created if it does not exist.
        path (`str` or `Path`): The `results.json`, or the output folder that contains it.
        method (`str`, *optional*): Method reported in `model-index`, a key of the scores such as
            `"dawin_mixture"` or `"task_arithmetic"`; defaults to `"dawin_sample"`.
        alpha (`float`, *optional*): Report the WiSE-FT sweep at this alpha instead of a method, for a pair
            model in `static` mode. Pair results only; excludes `method`.
        token (`bool` or `str`, *optional*): Hub token; defaults to the locally saved one.
        revision (`str`, *optional*): Branch to read the card from and commit to.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.

    Raises:
        ValueError: If the results have no scores for `method` or `alpha`, both are given, or the repository's
            card describes the other kind of DaWin model (pair or multi-task) than the results come from.
    """
    results, kind = load_saved_results(path)
    method, alpha = check_reported(results, kind, method=method, alpha=alpha)
    return _push_checked(repo_id, results, kind, method, alpha, token=token, revision=revision, create_pr=create_pr)


def _push_checked(repo_id: str, results: dict, kind: str, method: str | None, alpha: float | None, **hub_options):
    """Push results that [`check_reported`] accepted with the push function of their kind."""
    if kind == "multitask":
        from .hub_multitask import push_multitask_results_to_hub

        return push_multitask_results_to_hub(repo_id, results, method=method, **hub_options)

    from .hub import push_results_to_hub

    return push_results_to_hub(repo_id, results, method=method, static_alpha=alpha, **hub_options)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dawin push-results",
        description=(
            "Write the results.json of an earlier `hf-dawin evaluate` or `hf-dawin evaluate-multitask` run into "
            "the model card of a Hub repository, in one commit: a results table and one model-index entry per set."
        ),
    )
    parser.add_argument("repo_id", metavar="REPO", help="Hub repository; created if it does not exist.")
    parser.add_argument(
        "--results-dir", default="hf_dawin_results",
        help="Output folder of the evaluate run, or its results.json (default: hf_dawin_results).",
    )  # fmt: skip
    reported = parser.add_mutually_exclusive_group()
    reported.add_argument(
        "--method",
        help=(
            "Method reported in model-index, for example dawin_mixture or task_arithmetic (default: dawin_sample). "
            "It is not checked against the model: choose the method of the model's mode."
        ),
    )
    reported.add_argument(
        "--alpha", type=float, help="Report the WiSE-FT sweep at this alpha, for a pair model in static mode."
    )
    parser.add_argument("--revision", help="Branch to read the card from and commit to (default: main).")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    return parser


def main_push_results(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hf-dawin push-results`.

    Args:
        argv (`Sequence[str]`, *optional*): Arguments after the subcommand name.

    Returns:
        `int`: The exit status, 0 on success.
    """
    arguments = _build_parser().parse_args(list(argv or []))
    if is_offline_mode():
        raise SystemExit(
            "error: pushing results needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
            "(or set it to 0) and run the command again."
        )
    try:
        # A wrong folder or method is reported before any network call.
        results, kind = load_saved_results(arguments.results_dir)
        method, alpha = check_reported(results, kind, method=arguments.method, alpha=arguments.alpha)
    except (OSError, ValueError) as error:
        print(f"hf-dawin push-results: error: {one_line(error)}", file=sys.stderr)
        return 1
    try:
        commit = _push_checked(
            arguments.repo_id, results, kind, method, alpha, revision=arguments.revision, create_pr=arguments.create_pr
        )
    except ValueError as error:
        # The repository's card describes another kind of model than the one these results are from.
        print(f"hf-dawin push-results: error: {one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - network and Hub errors have no common base class
        logger.debug("hf-dawin push-results failed.", exc_info=True)
        print(
            f"hf-dawin push-results: error: pushing to {arguments.repo_id} failed ({type(error).__name__}: "
            f"{one_line(error)}). "
            "Check the connection, HF_ENDPOINT and your token, then run the command again.",
            file=sys.stderr,
        )
        return 1
    if arguments.create_pr:
        print(f"Pull request with the results opened on {arguments.repo_id}: {commit.pr_url}")
    else:
        print(f"Results written into the model card of {arguments.repo_id}: {commit.commit_url}")
    return 0
