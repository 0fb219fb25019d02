"""Configuration of multi-task DaWin models: one pre-trained CLIP, several fine-tuned CLIPs and their tasks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from transformers import CLIPConfig, PreTrainedConfig
from transformers.utils import logging

from .config_recovery import RecoveringConfigMixin
from .heads import check_class_names, class_names_from_id2label, class_names_from_label2id


logger = logging.get_logger(__name__)

__all__ = [
    "MULTITASK_MODES",
    "DaWinMultiTaskCLIPConfig",
    "check_multitask_mode",
    "check_scale",
    "check_task",
]

MULTITASK_MODES = ("sample", "dataset_mean", "task_arithmetic", "weight_average", "ties", "pretrained")
DEFAULT_SCALE = 0.3
DEFAULT_TIES_DENSITY = 0.2
DEFAULT_TIES_SCALE = 1.0


def check_multitask_mode(mode: str) -> str:
    """Return `mode` if it is one of [`MULTITASK_MODES`], else raise a ValueError listing the valid modes."""
    if mode not in MULTITASK_MODES:
        raise ValueError(
            f"Unknown multi-task DaWin mode {mode!r}; valid modes are {', '.join(repr(m) for m in MULTITASK_MODES)}."
        )
    return mode


def _check_positive(value: float, name: str, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} is {meaning} and must be a positive finite number, received {value!r}.")
    return float(value)


def check_scale(scale: float) -> float:
    """Return the task-arithmetic scale `s` as a float if it is positive and finite, else raise a ValueError."""
    return _check_positive(scale, "scale", "the task-arithmetic scale s in theta_0 + s * sum_t tau_t")


def check_task(task: str, tasks: Mapping[str, object]) -> str:
    """Return `task` if it is a key of `tasks`, else raise a ValueError listing the tasks.

    Raises:
        ValueError: If `task` is not one of the model's tasks.
    """
    if task not in tasks:
        raise ValueError(
            f"Unknown task {task!r}; this model classifies the tasks {', '.join(repr(name) for name in tasks)}. "
            "Pass one of them as `task=`, or set `model.config.default_task`."
        )
    return task


def _check_tasks(tasks: Mapping[str, object]) -> dict[str, list[str]]:
    if not isinstance(tasks, Mapping):
        raise TypeError(
            f"tasks must map each task name to its class names, for example {{'mnist': ['zero', 'one']}}, received "
            f"{type(tasks).__name__}."
        )
    checked = {}
    for name, class_names in tasks.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Task names must be non-empty strings, received {name!r}.")
        try:
            checked[name] = check_class_names(class_names)
        except ValueError as error:
            raise ValueError(f"Task {name!r}: {error}") from error
    return checked


def _order_tasks(tasks: dict[str, list[str]], task_order: Sequence[str] | None) -> dict[str, list[str]]:
    """Return `tasks` in the order of `task_order`, which must name each task once; `None` keeps the order."""
    if task_order is None:
        return tasks
    if sorted(task_order) != sorted(tasks) or len(set(task_order)) != len(task_order):
        raise ValueError(
            f"task_order must name every task once, received {list(task_order)} for the tasks {sorted(tasks)}. "
            "Omit task_order to keep the order of tasks."
        )
    return {name: tasks[name] for name in task_order}


class DaWinMultiTaskCLIPConfig(RecoveringConfigMixin, PreTrainedConfig):
    r"""Configuration of a [`DaWinMultiTaskCLIPModel`]: a pre-trained CLIP, T fine-tuned CLIPs and the tasks.

    With task vectors tau_t = theta_t - theta_0, the model classifies an image x of a task with the weights
    theta_0 + s * T * sum_t pi_t(x) tau_t, where pi(x) is the softmax over t of the negative entropies of the
    fine-tuned endpoints' predictions with that task's heads.

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*): Architecture shared by all endpoints.
        tasks (`dict[str, list[str]]`, *optional*): Class names of each task, in task order.
        task_order (`list[str]`, *optional*): The task names in the order of `tasks`, which is the order of the
            model's heads. `config.json` stores mappings with sorted keys, so the order is saved as this list and
            restored on load; it defaults to the order of `tasks`.
        templates (`dict[str, list[str]]`, *optional*): Prompt templates the zero-shot heads of each task were
            built with.
        scale (`float`, *optional*, defaults to 0.3): Task-arithmetic scale s.
        mode (`str`, *optional*, defaults to `"sample"`): Default forward mode. `"sample"` is exact per-sample
            interpolation and `"dataset_mean"` uses the mean of pi over a calibration set, per task. The static
            baselines are `"task_arithmetic"` (theta_0 + s * sum_t tau_t), `"weight_average"` (the mean of the
            fine-tuned endpoints), `"ties"` (TIES-merging) and `"pretrained"`.
        num_fine_tuned (`int`, *optional*, defaults to 0): Number T of fine-tuned endpoints.
        fine_tuned_names (`list[str]`, *optional*): A short name per fine-tuned endpoint, used in tables.
        pretrained_name_or_path (`str`, *optional*): Where the pre-trained endpoint came from.
        fine_tuned_names_or_paths (`list[str]`, *optional*): Where each fine-tuned endpoint came from.
        default_task (`str`, *optional*): Task used when `forward` gets no `task`; defaults to the first task.
            Assigning it also sets `id2label` and `label2id`, so set it before building a pipeline.
        dataset_task_weights (`dict[str, list[float]]`, *optional*): Mean pi per task, set by
            `fit_dataset_coefficients` and used by `"dataset_mean"` mode.
        ties_density (`float`, *optional*, defaults to 0.2): Fraction of each task-vector tensor's entries, by
            magnitude, that TIES-merging keeps.
        ties_scale (`float`, *optional*, defaults to 1.0): Scale of the TIES-merged task vector.

    Example:

    ```python
    >>> from transformers import CLIPConfig
    >>> from hf_dawin.configuration_multitask import DaWinMultiTaskCLIPConfig
    >>> config = DaWinMultiTaskCLIPConfig(
    ...     clip_config=CLIPConfig().to_dict(), tasks={"digits": ["zero", "one"], "pets": ["cat", "dog"]},
    ...     num_fine_tuned=2,
    ... )
    >>> config.default_task, config.id2label
    ('digits', {0: 'zero', 1: 'one'})
    >>> config.default_task = "pets"
    >>> config.id2label
    {0: 'cat', 1: 'dog'}
    ```
    """

    model_type = "dawin_multitask_clip"
    sub_configs_defaults = {"clip_config": CLIPConfig}

    clip_config: dict | CLIPConfig | None = None
    tasks: dict | None = None
    task_order: list[str] | None = None
    templates: dict | None = None
    scale: float = DEFAULT_SCALE
    mode: str = "sample"
    num_fine_tuned: int = 0
    fine_tuned_names: list[str] | None = None
    pretrained_name_or_path: str | None = None
    fine_tuned_names_or_paths: list | None = None
    default_task: str | None = None
    dataset_task_weights: dict | None = None
    ties_density: float = DEFAULT_TIES_DENSITY
    ties_scale: float = DEFAULT_TIES_SCALE

    def __post_init__(self, **kwargs):
        self.check_settings()
        if isinstance(self.num_fine_tuned, bool) or not isinstance(self.num_fine_tuned, int) or self.num_fine_tuned < 0:
            raise ValueError(f"num_fine_tuned must be a non-negative integer, received {self.num_fine_tuned!r}.")
        if self.fine_tuned_names is None:
            self.fine_tuned_names = [f"fine_tuned_{index + 1}" for index in range(self.num_fine_tuned)]
        if len(self.fine_tuned_names) != self.num_fine_tuned:
            raise ValueError(
                f"Expected one name per fine-tuned endpoint ({self.num_fine_tuned}), received "
                f"{len(self.fine_tuned_names)}: {self.fine_tuned_names}."
            )
        if self.tasks is not None:
            self.tasks = _order_tasks(_check_tasks(self.tasks), self.task_order)
            self.task_order = list(self.tasks)
            if self.default_task is None and self.tasks:
                self.default_task = next(iter(self.tasks))
            if self.default_task is not None:
                check_task(self.default_task, self.tasks)
                self._set_labels(self.default_task)
        super().__post_init__(**kwargs)

    def check_settings(self) -> None:
        """Check the merging settings (mode, scales, TIES density) and raise a ValueError naming a bad one.

        `DaWinMultiTaskCLIPModel.from_pretrained` calls this again, because transformers sets the settings passed
        to it as keyword arguments after construction, without checks.
        """
        check_multitask_mode(self.mode)
        self.scale = check_scale(self.scale)
        self.ties_scale = _check_positive(self.ties_scale, "ties_scale", "the scale of the TIES-merged task vector")
        if (
            isinstance(self.ties_density, bool)
            or not isinstance(self.ties_density, (int, float))
            or not 0 < self.ties_density <= 1
        ):
            raise ValueError(
                f"ties_density is the fraction of task-vector entries TIES-merging keeps and must lie in (0, 1], "
                f"received {self.ties_density!r}."
            )
        self.ties_density = float(self.ties_density)

    def _set_labels(self, task: str) -> None:
        names = self.tasks[task]
        # Assign through object.__setattr__ so that this does not recurse into the default_task hook.
        object.__setattr__(self, "id2label", {index: name for index, name in enumerate(names)})
        object.__setattr__(self, "label2id", {name: index for index, name in enumerate(names)})

    def __setattr__(self, key, value):
        # After construction, switching the default task also switches the labels that pipelines report.
        if key == "default_task" and getattr(self, "_post_init_done", False) and value is not None:
            check_task(value, self.tasks or {})
            super().__setattr__(key, value)
            self._set_labels(value)
            return
        if getattr(self, "_post_init_done", False) and value is not None and self.tasks:
            # Setting id2label or label2id (directly or as a from_pretrained argument) renames the default task's
            # classes, because they list them.
            if key in ("id2label", "label2id"):
                task = self.default_task
                rename = class_names_from_id2label if key == "id2label" else class_names_from_label2id
                names = rename(value, len(self.tasks[task]))
                object.__setattr__(self, "tasks", {**self.tasks, task: names})
                self._set_labels(task)
                return
            # Assigning tasks may only rename classes, because the heads fix the tasks, their order and class counts.
            if key == "tasks":
                object.__setattr__(self, "tasks", self._renamed_tasks(value))
                self._set_labels(self.default_task)
                return
        super().__setattr__(key, value)

    def _renamed_tasks(self, tasks: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """Return `tasks` checked against the current tasks (same names and class counts), in the current order."""
        checked = _check_tasks(tasks)
        counts = {name: len(names) for name, names in self.tasks.items()}
        new_counts = {name: len(names) for name, names in checked.items()}
        if new_counts != counts:
            raise ValueError(
                f"tasks must keep the tasks and class counts of the heads, {counts}, received {new_counts}. Pass new "
                "class names of the same classes to rename them. To classify other tasks or classes, build a new "
                "model with DaWinMultiTaskCLIPModel.from_pretrained_endpoints."
            )
        return {name: checked[name] for name in self.tasks}

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # transformers applies keyword arguments in the order given. default_task goes first, so that id2label and
        # label2id rename the classes of the task that ends up as the default.
        if "default_task" in kwargs:
            kwargs = {"default_task": kwargs.pop("default_task"), **kwargs}
        return super().from_dict(config_dict, **kwargs)

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks, in order."""
        return list(self.tasks or {})

    def num_classes(self, task: str) -> int:
        """Number of classes of `task`."""
        return len(self.tasks[check_task(task, self.tasks or {})])
