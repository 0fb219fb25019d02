"""Distribution-shift evaluation of a DaWin pair against its baselines.

For every evaluation set the two endpoint passes run once. Their logits, projected to the set's label space,
feed every method that needs them: zero-shot, fine-tuned, output ensemble, entropy selection, DaWin's
coefficients, and the oracle, which mixes the endpoints' probabilities with a coefficient computed from the label.
Methods with their own weights (DaWin `sample` and `mixture`, the WiSE-FT sweep) then share one more pass over
the set: each batch is read and preprocessed once and classified by all of them. When the sweep's merged models
do not fit in memory together, the sweep is split over several passes. Only per-sample logits, labels and
coefficients are kept between passes, never images.

Under `accelerate launch` or `torchrun` every pass is sharded across the processes by batch and the
per-sample results are gathered back in example order (see `hf_dawin.distributed`), so a multi-process run
scores the same arrays as a single-process one.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .coefficients import (
    EntropyStatistics,
    coefficients_from_entropies,
    entropy,
    entropy_statistics,
    oracle_coefficients,
    output_ensemble_probabilities,
)
from .distributed import DistributedState, get_distributed_state
from .label_spaces import LabelSpaceProjection
from .mixture import BetaMixture
from .modeling_dawin import DaWinCLIPModel
from .placement import free_memory, module_bytes
from .scoring import compute_scores


logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_ALPHAS",
    "EvaluationSet",
    "EvaluationSettings",
    "SetPredictions",
    "check_labels",
    "collect_endpoint_predictions",
    "evaluate_pair",
    "method_label",
    "run_gathered_pass",
    "run_method_pass",
    "summarize",
]

DEFAULT_ALPHAS = tuple(round(step / 10, 1) for step in range(11))

# Methods in the order they are reported. "oracle" reads the labels, so it is for analysis only.
METHODS = (
    "zero_shot",
    "fine_tuned",
    "wise_ft_0.5",
    "wise_ft_best",
    "output_ensemble",
    "entropy_selection",
    "dawin_sample",
    "dawin_mixture",
    "oracle",
)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""`(pixel_values, labels, indices)`: images `(batch_size, 3, height, width)`, class indices in the set's
label space `(batch_size,)` and the examples' positions in the set `(batch_size,)`."""


@dataclass
class EvaluationSet:
    """One evaluation set: a re-iterable source of batches and how its labels relate to the model's classes.

    Attributes:
        name (`str`): Name used in tables and files.
        batches (`Callable[[], Iterable[Batch]]`): Called once per pass; yields `(pixel_values, labels, indices)`.
        num_examples (`int`): Number of examples in the set.
        in_distribution (`bool`): Whether this is the in-distribution (ID) set; others count as OOD.
        projection ([`LabelSpaceProjection`], *optional*): Maps model logits to the set's label space.
        shard_batches (`Callable[[DistributedState], Iterable[Batch]]`, *optional*): Called as
            `shard_batches(state)` in multi-process runs; yields only this process's batches, with indices into
            the whole set (see `dataset_shard_batches`); a `num_examples(state)` method, when present, sizes the
            progress bar. Without it every process reads all batches and keeps every `world_size`-th one.
    """

    name: str
    batches: Callable[[], Iterable[Batch]]
    num_examples: int
    in_distribution: bool = False
    projection: LabelSpaceProjection | None = None
    shard_batches: Callable[[DistributedState], Iterable[Batch]] | None = None


@dataclass
class EvaluationSettings:
    """Settings of a shift evaluation.

    Attributes:
        alphas (`Sequence[float]`): WiSE-FT sweep of static weights on the fine-tuned endpoint; 0.5 is always added.
        offset_adjustment (`bool`): Use the offset adjustment with each set's entropy statistics.
        n_components (`int`): Components of the Beta mixture fitted on each set's coefficients.
        progress (`bool`): Show progress bars.
        sweep_models_per_pass (`int`, *optional*): How many merged WiSE-FT models one pass over a set holds and
            runs. `None` fits as many as half the free memory of the model's device allows, shared by the
            processes of a multi-process run. Each further group of alphas costs one more read of every set, and
            the results are the same for any value.
    """

    alphas: Sequence[float] = DEFAULT_ALPHAS
    offset_adjustment: bool = False
    n_components: int = 3
    progress: bool = True
    sweep_models_per_pass: int | None = None


@dataclass
class SetPredictions:
    """Per-sample results of the endpoint pass over one set, ordered by example index.

    Attributes:
        zero_shot_logits (`torch.Tensor` of shape `(num_examples, num_classes)`): Projected zero-shot logits.
        fine_tuned_logits (`torch.Tensor` of shape `(num_examples, num_classes)`): Projected fine-tuned logits.
        labels (`torch.Tensor` of shape `(num_examples,)`): Class indices in the set's label space.
        indices (`torch.Tensor` of shape `(num_examples,)`): Sorted positions in the set of the examples that
            were read; unreadable images are skipped and reported by the batch source.
    """

    zero_shot_logits: torch.Tensor
    fine_tuned_logits: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    method_logits: dict[str, torch.Tensor] = field(default_factory=dict)


def _project(projection: LabelSpaceProjection | None, logits: torch.Tensor) -> torch.Tensor:
    return logits if projection is None else projection.project(logits)


def _local_batches(evaluation_set: EvaluationSet, state: DistributedState) -> Iterable[Batch]:
    """Return the batches of `evaluation_set` that this process runs."""
    if not state.is_distributed:
        return evaluation_set.batches()
    if evaluation_set.shard_batches is not None:
        return evaluation_set.shard_batches(state)
    return state.local_batches(evaluation_set.batches())


def _progress_bar(evaluation_set: EvaluationSet, description: str, progress: bool, state: DistributedState) -> tqdm:
    """A progress bar on the main process only; in multi-process runs it counts the main process's share."""
    total = evaluation_set.num_examples
    if state.is_distributed:
        count = getattr(evaluation_set.shard_batches, "num_examples", None)
        total = count(state) if count is not None else math.ceil(total / state.world_size)
    suffix = f" (rank 0 of {state.world_size})" if state.is_distributed else ""
    return tqdm(
        total=total,
        desc=f"{evaluation_set.name}: {description}{suffix}",
        unit="img",
        disable=not (progress and state.is_main_process),
    )


def _empty_logits(num_classes: int, projection: LabelSpaceProjection | None) -> torch.Tensor:
    """Projected logits of no examples, `(0, num_classes_of_the_set)`: what a rank without batches contributes."""
    return _project(projection, torch.zeros(0, num_classes))


def _default_state(state: DistributedState | None) -> DistributedState:
    return state if state is not None else get_distributed_state()


def _in_example_order(rows: dict[str, torch.Tensor], name: str, expected: torch.Tensor | None = None) -> dict:
    """Sort gathered per-sample rows by their `"indices"` entry, the examples' positions in the set.

    With `expected` (the indices returned by the endpoint pass), a later pass must return exactly those examples,
    once each; otherwise the set gets no result rather than a silently partial one.

    Returns:
        `dict[str, torch.Tensor]`: The same keys, rows in example order; `"indices"` is sorted.
    """
    positions = rows["indices"].long()
    order = torch.argsort(positions)
    sorted_positions = positions[order]
    repeated = sorted_positions.numel() > 1 and bool((sorted_positions[1:] == sorted_positions[:-1]).any())
    if repeated or (expected is not None and not torch.equal(sorted_positions, expected)):
        expected_count = len(expected) if expected is not None else sorted_positions.numel()
        raise RuntimeError(
            f"A pass over set '{name}' returned {sorted_positions.numel()} results that do not match the "
            f"{expected_count} examples of its endpoint pass (some are missing or repeated), so no result is written "
            "for this set."
        )
    return {key: sorted_positions if key == "indices" else value[order] for key, value in rows.items()}


def run_gathered_pass(
    evaluation_set: EvaluationSet,
    description: str,
    compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    empty: dict[str, torch.Tensor],
    *,
    step: str,
    progress: bool = True,
    state: DistributedState | None = None,
) -> dict[str, torch.Tensor]:
    """Run `compute` over a set's batches and return its per-sample rows for the whole set, in example order.

    In a multi-process run each rank computes its share of the batches and every rank returns the gathered rows
    of all ranks. A failure on any rank raises `RankFailedError` on every rank.

    Args:
        evaluation_set ([`EvaluationSet`]): The set to run over.
        description (`str`): Progress bar text, after the set's name.
        compute (`Callable`): Called as `compute(pixel_values, labels, indices)` per batch; returns tensors with
            one row per image of the batch, under the keys of `empty`.
        empty (`dict[str, torch.Tensor]`): Zero-row tensors with the trailing shape and dtype of each output; a
            rank without batches contributes them.
        step (`str`): What the pass is, for error messages (for example "the endpoint pass over set 'id'").
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar on the main process.
        state ([`DistributedState`], *optional*): The processes; defaults to the current launch.

    Returns:
        `dict[str, torch.Tensor]`: Each output of `compute` with rows of every example read, plus `"indices"`,
        the examples' sorted positions in the set. Unreadable images skipped by the batch source have no row.
    """
    state = _default_state(state)

    def run_local_batches() -> dict[str, torch.Tensor]:
        chunks = {name: [tensor] for name, tensor in empty.items()}
        chunks["indices"] = [torch.zeros(0, dtype=torch.long)]
        bar = _progress_bar(evaluation_set, description, progress, state)
        for pixel_values, labels, indices in _local_batches(evaluation_set, state):
            for name, value in compute(pixel_values, labels, indices).items():
                chunks[name].append(value.cpu())
            chunks["indices"].append(indices.cpu().long())
            bar.update(len(indices))
        bar.close()
        return {name: torch.cat(values) for name, values in chunks.items()}

    gathered = state.gather_rows(state.run(step, run_local_batches), step)
    return _in_example_order(gathered, evaluation_set.name)


def check_labels(labels: torch.Tensor, num_classes: int, where: str, advice: str) -> None:
    """Raise a `ValueError` listing the labels outside `0..num_classes - 1`; `where` names the set."""
    out_of_range = labels[(labels < 0) | (labels >= num_classes)]
    if out_of_range.numel():
        raise ValueError(
            f"{where} has labels {sorted(set(out_of_range.tolist()))[:10]} outside its label space of {num_classes} "
            f"classes (valid: 0..{num_classes - 1}). {advice}"
        )


@torch.inference_mode()
def collect_endpoint_predictions(
    model: DaWinCLIPModel,
    evaluation_set: EvaluationSet,
    *,
    progress: bool = True,
    state: DistributedState | None = None,
) -> SetPredictions:
    """Run both endpoints once over a set and keep their projected logits and the labels.

    In a multi-process run each rank runs its share of the batches and every rank returns the gathered
    predictions of the whole set.

    Raises:
        ValueError: If the set is empty or a label is outside the set's label space.
        RankFailedError: If a rank of a multi-process run failed (the message names it).
    """
    if evaluation_set.num_examples == 0:
        raise ValueError(f"Evaluation set '{evaluation_set.name}' is empty; it needs at least one example.")
    projection = evaluation_set.projection

    def compute(pixel_values, labels, indices):
        zero_shot_logits, fine_tuned_logits = model.endpoint_logits(pixel_values)
        return {
            "zero_shot": _project(projection, zero_shot_logits),
            "fine_tuned": _project(projection, fine_tuned_logits),
            "labels": labels.long(),
        }

    empty_logits = _empty_logits(model.config.num_classes, projection)
    empty = {"zero_shot": empty_logits, "fine_tuned": empty_logits, "labels": torch.zeros(0, dtype=torch.long)}
    rows = run_gathered_pass(
        evaluation_set, "endpoints", compute, empty,
        step=f"the endpoint pass over set '{evaluation_set.name}'", progress=progress, state=state,
    )  # fmt: skip
    if rows["indices"].numel() == 0:
        raise ValueError(
            f"Evaluation set '{evaluation_set.name}' has no readable images. Check that its image column holds "
            "images that PIL can open. A warning above counts the skipped images and names the first."
        )
    predictions = SetPredictions(
        zero_shot_logits=rows["zero_shot"],
        fine_tuned_logits=rows["fine_tuned"],
        labels=rows["labels"],
        indices=rows["indices"],
    )
    check_labels(
        predictions.labels, predictions.zero_shot_logits.shape[1], f"Set '{evaluation_set.name}'",
        "Check the label column and the class names or projection of this set.",
    )  # fmt: skip
    return predictions


@torch.inference_mode()
def run_method_pass(
    evaluation_set: EvaluationSet,
    expected: torch.Tensor,
    description: str,
    methods: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    *,
    num_classes: int,
    progress: bool = True,
    state: DistributedState | None = None,
) -> dict[str, torch.Tensor]:
    """Read a set once, classify every batch with each of several methods, and return their projected logits.

    Each method is called as `classify(pixel_values, rows)`, where `rows` are the batch's positions among
    `expected`, the examples of the endpoint pass, so that it can look up per-sample values such as
    coefficients. Every method gets the same batches as it would in a pass of its own, so its logits do not
    depend on which methods share the pass. In a multi-process run each rank classifies its share and every
    rank returns the gathered logits of the whole set.

    Args:
        evaluation_set ([`EvaluationSet`]): The set of the endpoint pass.
        expected (`torch.Tensor` of shape `(num_examples,)`): Sorted indices returned by the endpoint pass.
        description (`str`): Progress bar text.
        methods (`Mapping[str, Callable]`): Method name to a function returning logits `(batch_size,
            num_classes)` in the model's label space.
        num_classes (`int`): Classes of the model's logits, before the set's projection.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar on the main process.
        state ([`DistributedState`], *optional*): The processes; defaults to the current launch.

    Returns:
        `dict[str, torch.Tensor]`: Per method, logits of shape `(len(expected), num_classes_of_the_set)`.

    Raises:
        ValueError: If a method is named `"indices"`, the key of the examples' positions.
        RuntimeError: If the pass did not return exactly the examples in `expected`.
    """
    if "indices" in methods:
        raise ValueError("The method name 'indices' is reserved for the examples' positions. Choose another name.")
    projection = evaluation_set.projection

    def compute(pixel_values, labels, indices):
        rows = torch.searchsorted(expected, indices.cpu().long()).clamp_max(expected.numel() - 1)
        return {name: _project(projection, classify(pixel_values, rows)) for name, classify in methods.items()}

    empty = _empty_logits(num_classes, projection)
    rows = run_gathered_pass(
        evaluation_set, description, compute, {name: empty for name in methods},
        step=f"the {description} pass over set '{evaluation_set.name}'", progress=progress, state=state,
    )  # fmt: skip
    ordered = _in_example_order(rows, evaluation_set.name, expected)
    return {name: ordered[name] for name in methods}


def checked_models_per_pass(value) -> int | None:
    """Return `EvaluationSettings.sweep_models_per_pass` as a Python `int` (or `None`), or raise a `ValueError`."""
    if value is None:
        return None
    try:
        # operator.index accepts Python and NumPy integers, and rejects floats and strings.
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"sweep_models_per_pass must be a positive integer or None, received {value!r}.")
    return count


def sweep_groups(
    model: DaWinCLIPModel,
    alphas: Sequence[float],
    settings: EvaluationSettings,
    state: DistributedState,
) -> list[list[float]]:
    """Split the WiSE-FT alphas that need a merged model into groups, one pass over each set per group.

    The alphas 0 and 1 are the endpoints and need no pass. Without `settings.sweep_models_per_pass`, the main
    process sizes the groups from the free memory of the model's device. Half of it, divided among the
    processes of the launch, must have room for the first pass's per-sample mixed model, the mixture's
    components and the merged models of one group (at least one). Every rank uses the main process's groups.
    """
    per_pass = checked_models_per_pass(settings.sweep_models_per_pass)
    merged = [alpha for alpha in alphas if alpha not in (0.0, 1.0)]
    if not merged:
        return []
    if per_pass is None:

        def plan() -> dict:
            classifier = model.endpoint_classifiers()[0]
            available = free_memory(model.zero_shot_head.weight.device)
            if available is None:
                return {"per_pass": 1}
            processes = int(os.environ.get("LOCAL_WORLD_SIZE", state.world_size))
            budget = available // 2 // max(processes, 1)
            # The first pass also keeps the mixed model (one task vector per weight) and the K components.
            fitting = budget // max(module_bytes(classifier), 1) - 1 - settings.n_components
            return {"per_pass": max(1, int(fitting))}

        per_pass = _fit_on_main(state, "sizing the WiSE-FT sweep's passes", plan, lambda fitted: fitted["per_pass"])
    return [merged[start : start + per_pass] for start in range(0, len(merged), per_pass)]


def _sweep_description(group: Sequence[float]) -> str:
    if len(group) == 1:
        return f"WiSE-FT alpha={group[0]:g}"
    return f"WiSE-FT alpha={group[0]:g}..{group[-1]:g} ({len(group)} models)"


def _fit_on_main(state: DistributedState, step: str, fit: Callable[[], dict], load: Callable[[dict], object]):
    """Run a set-level fit on the main process only and load its JSON form on every rank.

    With one process the fitted object still goes through its dictionary form, so single- and multi-process
    runs use identical values.
    """
    fitted = state.run(step, fit) if state.is_main_process else None
    if not state.is_main_process:
        state.check_all_ranks(None, step)
    return load(state.broadcast_json(fitted, step))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # Counting in integers and dividing in Python gives the exact ratio, as the metric modules report it.
    if labels.numel() == 0:
        return float("nan")
    return int((logits.argmax(dim=-1) == labels).sum()) / labels.numel()


def _skipped_positions(indices: torch.Tensor, num_examples: int) -> list[int]:
    """Return the positions in `range(num_examples)` that are missing from the sorted `indices` of examples read."""
    read = torch.zeros(num_examples, dtype=torch.bool)
    read[indices.long()] = True
    return (~read).nonzero().flatten().tolist()


def evaluate_pair(
    model: DaWinCLIPModel,
    sets: Sequence[EvaluationSet],
    settings: EvaluationSettings | None = None,
    *,
    state: DistributedState | None = None,
) -> dict:
    """Evaluate DaWin and its baselines on an in-distribution set and shifted sets.

    Args:
        model ([`DaWinCLIPModel`]): The pair to evaluate.
        sets (`Sequence[EvaluationSet]`): Exactly one set with `in_distribution=True`, and any shifted sets.
        settings ([`EvaluationSettings`], *optional*): Sweep, offset adjustment, mixture size and progress bars.
        state ([`DistributedState`], *optional*): Rank and world size of a multi-process run; defaults to the
            initialised process group, if any, else a single process. Every rank returns the same results.

    Returns:
        `dict` (JSON-serialisable) with per-set scores of every method, the WiSE-FT sweep, per-set coefficient
        statistics and fitted mixtures, and a summary of ID accuracy and OOD average per method.

    Raises:
        ValueError: If no set or more than one set is in-distribution, or a set is empty.
        RankFailedError: If a rank of a multi-process run failed; every rank raises it.
    """
    settings = settings or EvaluationSettings()
    state = _default_state(state)
    in_distribution = [s.name for s in sets if s.in_distribution]
    if len(in_distribution) != 1:
        raise ValueError(
            f"Expected exactly one in-distribution set, received {len(in_distribution)} ({in_distribution}). Mark the "
            "set the fine-tuned endpoint was trained for as in-distribution."
        )
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(
            f"Evaluation set names must be distinct, received {names}. Give each set its own name, for example "
            "--shift-dataset NAME=SOURCE on the command line."
        )
    alphas = sorted({float(alpha) for alpha in settings.alphas} | {0.5})
    for alpha in alphas:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"WiSE-FT sweep values must lie in [0, 1], received {alpha}.")
    zero_shot_temperature, fine_tuned_temperature = model.config.temperatures
    temperatures = (zero_shot_temperature, fine_tuned_temperature)
    groups = sweep_groups(model, alphas, settings, state)

    # Endpoint passes: once per set, reused by every method below.
    predictions = {
        s.name: collect_endpoint_predictions(model, s, progress=settings.progress, state=state) for s in sets
    }

    # Coefficients and the mixture of each set, from the endpoint logits alone.
    per_set = {}
    for evaluation_set in sets:
        p = predictions[evaluation_set.name]
        zero_shot_entropy = entropy(p.zero_shot_logits, zero_shot_temperature)
        fine_tuned_entropy = entropy(p.fine_tuned_logits, fine_tuned_temperature)
        statistics = None
        if settings.offset_adjustment:
            statistics = _fit_on_main(
                state,
                f"the entropy statistics of set '{evaluation_set.name}'",
                lambda: entropy_statistics(zero_shot_entropy, fine_tuned_entropy).to_dict(),
                EntropyStatistics.from_dict,
            )
        coefficients = coefficients_from_entropies(zero_shot_entropy, fine_tuned_entropy, statistics)
        mixture = _fit_on_main(
            state,
            f"the Beta mixture of set '{evaluation_set.name}'",
            lambda: BetaMixture(n_components=settings.n_components).fit(coefficients.numpy()).to_dict(),
            BetaMixture.from_dict,
        )
        per_set[evaluation_set.name] = {
            "coefficients": coefficients,
            "statistics": statistics,
            "mixture": mixture,
            "zero_shot_entropy": zero_shot_entropy,
            "fine_tuned_entropy": fine_tuned_entropy,
        }

    # Methods that need only the endpoint logits.
    for evaluation_set in sets:
        p = predictions[evaluation_set.name]
        info = per_set[evaluation_set.name]
        p.method_logits["zero_shot"] = p.zero_shot_logits
        p.method_logits["fine_tuned"] = p.fine_tuned_logits
        ensemble = output_ensemble_probabilities(p.zero_shot_logits, p.fine_tuned_logits, info["coefficients"], temperatures)
        p.method_logits["output_ensemble"] = ensemble.log()
        choose_fine_tuned = (info["fine_tuned_entropy"] < info["zero_shot_entropy"]).unsqueeze(-1)
        p.method_logits["entropy_selection"] = torch.where(choose_fine_tuned, p.fine_tuned_logits, p.zero_shot_logits)

    # DaWin (exact per-sample interpolation and the mixture components) and the WiSE-FT sweep's merged models
    # share the passes over a set. The merged models are released after every pass and rebuilt for the next set.
    # For the ViT-B/32-sized pair on CPU, building one costs less than a tenth of a batch-32 forward pass.
    sweep_logits: dict[tuple[str, float], torch.Tensor] = {}
    for evaluation_set in sets:
        p = predictions[evaluation_set.name]
        coefficients = per_set[evaluation_set.name]["coefficients"]
        mixture = per_set[evaluation_set.name]["mixture"]
        for position, group in enumerate(groups or [[]]):
            methods = {}
            parts = []
            if position == 0:
                methods["dawin_sample"] = lambda pixel_values, rows, c=coefficients: model.interpolated_logits(
                    pixel_values, c[rows]
                )
                methods["dawin_mixture"] = lambda pixel_values, rows, c=coefficients, m=mixture: model.mixture_logits(
                    pixel_values, c[rows], m
                )[0]
                parts.append("DaWin sample and mixture")
            if group:
                parts.append(_sweep_description(group))
            description = ", ".join(parts)
            for alpha in group:
                methods[f"alpha={alpha!r}"] = lambda pixel_values, rows, a=alpha: model.static_logits(pixel_values, a)
            logits = run_method_pass(
                evaluation_set, p.indices, description, methods,
                num_classes=model.config.num_classes, progress=settings.progress, state=state,
            )  # fmt: skip
            model.clear_merged_cache()
            for method in ("dawin_sample", "dawin_mixture"):
                if method in logits:
                    p.method_logits[method] = logits[method]
            for alpha in group:
                sweep_logits[(evaluation_set.name, alpha)] = logits[f"alpha={alpha!r}"]
        sweep_logits[(evaluation_set.name, 0.0)] = p.zero_shot_logits
        sweep_logits[(evaluation_set.name, 1.0)] = p.fine_tuned_logits
    sweep = {
        s.name: [_accuracy(sweep_logits[(s.name, alpha)], predictions[s.name].labels) for alpha in alphas] for s in sets
    }

    ood_names = [s.name for s in sets if not s.in_distribution]
    id_name = in_distribution[0]

    def ood_average(values: dict[str, float]) -> float | None:
        # None (JSON null) without shifted sets: JSON has no NaN.
        return float(np.mean([values[name] for name in ood_names])) if ood_names else None

    # The best static alpha is chosen by OOD average accuracy: an oracle choice that favours WiSE-FT.
    ood_by_alpha = [ood_average({name: sweep[name][i] for name in sweep}) for i in range(len(alphas))]
    if ood_names:
        best_index = int(np.argmax(ood_by_alpha))
    else:
        best_index = int(np.argmax(sweep[id_name]))
    best_alpha = alphas[best_index]
    for evaluation_set in sets:
        p = predictions[evaluation_set.name]
        p.method_logits["wise_ft_0.5"] = sweep_logits[(evaluation_set.name, 0.5)]
        p.method_logits["wise_ft_best"] = sweep_logits[(evaluation_set.name, best_alpha)]
        oracle = oracle_coefficients(p.zero_shot_logits, p.fine_tuned_logits, p.labels, temperatures)
        p.method_logits["oracle"] = output_ensemble_probabilities(
            p.zero_shot_logits, p.fine_tuned_logits, oracle, temperatures
        ).log()

    # Scores.
    results_sets = {}
    for evaluation_set in sets:
        p = predictions[evaluation_set.name]
        info = per_set[evaluation_set.name]
        scores = {}
        for method in METHODS:
            scores[method] = compute_scores(p.method_logits[method].argmax(dim=-1).tolist(), p.labels.tolist())
        coefficients = info["coefficients"]
        results_sets[evaluation_set.name] = {
            "in_distribution": evaluation_set.in_distribution,
            "num_examples": int(p.labels.numel()),
            "num_skipped": evaluation_set.num_examples - int(p.labels.numel()),
            # Positions of the unreadable images: per-sample arrays such as the coefficients skip these rows.
            "skipped_positions": _skipped_positions(p.indices, evaluation_set.num_examples),
            "num_classes": int(p.zero_shot_logits.shape[1]),
            "scores": scores,
            "coefficients": {
                "mean": float(coefficients.mean()),
                "std": float(coefficients.std()) if coefficients.numel() > 1 else 0.0,
                "histogram": np.histogram(coefficients.numpy(), bins=20, range=(0.0, 1.0))[0].tolist(),
            },
            "entropy_statistics": None if info["statistics"] is None else info["statistics"].to_dict(),
            "mixture": info["mixture"].to_dict(),
        }

    summary = {}
    for method in METHODS:
        accuracies = {name: results_sets[name]["scores"][method]["accuracy"] for name in results_sets}
        summary[method] = {"id": accuracies[id_name], "ood_average": ood_average(accuracies)}
    return {
        "in_distribution": id_name,
        "out_of_distribution": ood_names,
        "settings": {
            **asdict(settings),
            "alphas": alphas,
            "temperatures": list(temperatures),
            "sweep_models_per_pass": checked_models_per_pass(settings.sweep_models_per_pass),
        },
        "sets": results_sets,
        "wise_ft_sweep": {
            "alphas": alphas,
            "accuracy": sweep,
            "ood_average": ood_by_alpha if ood_names else None,
            "best_alpha": best_alpha,
            "best_alpha_criterion": "OOD average accuracy" if ood_names else "ID accuracy",
        },
        "summary": summary,
        "coefficients": {name: per_set[name]["coefficients"].tolist() for name in per_set},
    }


METHOD_LABELS = {
    "zero_shot": "Zero-shot",
    "fine_tuned": "Fine-tuned",
    "wise_ft_0.5": "WiSE-FT (alpha=0.5)",
    "wise_ft_best": "WiSE-FT (best alpha)",
    "output_ensemble": "Dynamic output ensemble",
    "entropy_selection": "Entropy selection",
    "dawin_sample": "DaWin (sample)",
    "dawin_mixture": "DaWin (mixture)",
    "oracle": "Oracle output ensemble (uses labels)",
}


def method_label(method: str, results: Mapping) -> str:
    """Return the readable name of `method` in `results` of [`evaluate_pair`], with the alpha the sweep chose."""
    if method == "wise_ft_best":
        return f"WiSE-FT (best alpha={results['wise_ft_sweep']['best_alpha']:g})"
    return METHOD_LABELS.get(method, method)


def summarize(results: dict, *, markdown: bool = False) -> str:
    """Format the accuracy table: one row per method, one column per set, then the OOD average.

    Args:
        results (`dict`): Output of [`evaluate_pair`].
        markdown (`bool`, *optional*, defaults to `False`): Markdown table instead of aligned text.

    Returns:
        `str`: Accuracies in percent.
    """
    set_names = list(results["sets"])
    headers = ["Method"] + [f"{name} (ID)" if name == results["in_distribution"] else name for name in set_names]
    headers.append("OOD avg")
    rows = []
    for method in METHODS:
        row = [method_label(method, results)]
        row += [f"{100 * results['sets'][name]['scores'][method]['accuracy']:.2f}" for name in set_names]
        average = results["summary"][method]["ood_average"]
        row.append("-" if average is None else f"{100 * average:.2f}")
        rows.append(row)

    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
