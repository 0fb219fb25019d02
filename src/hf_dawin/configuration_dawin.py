"""Configuration of DaWin models: the shared CLIP architecture and the interpolation settings."""

from __future__ import annotations

import math

from transformers import CLIPConfig, PreTrainedConfig
from transformers.utils import logging

from .coefficients import check_temperatures
from .config_recovery import RecoveringConfigMixin
from .heads import check_class_names, class_names_from_id2label, class_names_from_label2id


logger = logging.get_logger(__name__)

__all__ = ["MODES", "DaWinCLIPConfig", "check_alpha", "check_mode"]

MODES = ("sample", "mixture", "static", "zero_shot", "fine_tuned", "output_ensemble")


def check_mode(mode: str) -> str:
    """Return `mode` if it is one of [`MODES`], else raise a ValueError listing the valid modes."""
    if mode not in MODES:
        raise ValueError(f"Unknown DaWin mode {mode!r}; valid modes are {', '.join(repr(m) for m in MODES)}.")
    return mode


def check_alpha(alpha: float) -> float:
    """Return `alpha` as a float if it lies in [0, 1], else raise a ValueError.

    A one-element tensor or NumPy scalar counts as its value.
    """
    if hasattr(alpha, "item") and getattr(alpha, "ndim", 1) == 0 and not isinstance(alpha, bool):
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(
            f"alpha is the static weight on the fine-tuned endpoint and must lie in [0, 1], received {alpha!r}."
        )
    return float(alpha)


class DaWinCLIPConfig(RecoveringConfigMixin, PreTrainedConfig):
    r"""Configuration of a [`DaWinCLIPModel`]: two CLIP endpoints of one architecture and how to interpolate them.

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*): Architecture shared by both endpoints.
        class_names (`list[str]`, *optional*): One name per class of the heads. `id2label` and `label2id` follow
            it, and setting either of them to new names of the same classes renames them.
        mode (`str`, *optional*, defaults to `"sample"`): Default forward mode, one of `"sample"` (exact
            per-sample interpolation), `"mixture"` (Beta mixture components), `"static"` (WiSE-FT with `alpha`),
            `"zero_shot"`, `"fine_tuned"`, `"output_ensemble"`.
        alpha (`float`, *optional*, defaults to 0.5): Static weight on the fine-tuned endpoint for `"static"` mode.
        temperatures (`list[float]`, *optional*, defaults to `[1.0, 1.0]`): Softmax temperatures
            `(zero_shot, fine_tuned)` for the entropies.
        offset_adjustment (`bool`, *optional*, defaults to `False`): Apply the offset adjustment to coefficients;
            needs `entropy_statistics` (set by calibration) when the model runs on single images.
        entropy_statistics (`dict`, *optional*): Set-level entropy statistics from a calibration set.
        n_components (`int`, *optional*, defaults to 3): Components of the Beta mixture.
        mixture (`dict`, *optional*): The fitted Beta mixture (see `BetaMixture.to_dict`).
        zero_shot_name_or_path (`str`, *optional*): Where the zero-shot endpoint came from.
        fine_tuned_name_or_path (`str`, *optional*): Where the fine-tuned endpoint came from.
        templates (`list[str]`, *optional*): Prompt templates the zero-shot heads were built with.
        head_sources (`dict[str, str]`, *optional*): How each endpoint's head was made: `"text"` or `"linear"`.

    Example:

    ```python
    >>> from transformers import CLIPConfig
    >>> from hf_dawin import DaWinCLIPConfig
    >>> config = DaWinCLIPConfig(clip_config=CLIPConfig().to_dict(), class_names=["cat", "dog"], mode="sample")
    >>> config.id2label
    {0: 'cat', 1: 'dog'}
    ```
    """

    model_type = "dawin_clip"
    sub_configs_defaults = {"clip_config": CLIPConfig}

    clip_config: dict | CLIPConfig | None = None
    class_names: list[str] | None = None
    mode: str = "sample"
    alpha: float = 0.5
    temperatures: list[float] | tuple[float, float] | None = None
    offset_adjustment: bool = False
    entropy_statistics: dict | None = None
    n_components: int = 3
    mixture: dict | None = None
    zero_shot_name_or_path: str | None = None
    fine_tuned_name_or_path: str | None = None
    templates: list[str] | None = None
    head_sources: dict | None = None

    def __post_init__(self, **kwargs):
        self.check_settings()
        super().__post_init__(**kwargs)

    def check_settings(self) -> None:
        """Check the interpolation settings, normalise their types, and raise a ValueError naming a bad one.

        `DaWinCLIPModel.from_pretrained` calls this again, because transformers sets the settings passed to it as
        keyword arguments after construction, without checks.
        """
        check_mode(self.mode)
        self.alpha = check_alpha(self.alpha)
        self.temperatures = list(check_temperatures(self.temperatures if self.temperatures is not None else (1.0, 1.0)))
        if isinstance(self.n_components, bool) or not isinstance(self.n_components, int) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive integer, received {self.n_components!r}.")
        if not isinstance(self.offset_adjustment, bool):
            raise ValueError(f"offset_adjustment must be True or False, received {self.offset_adjustment!r}.")
        if self.class_names is not None:
            self.class_names = check_class_names(self.class_names)
            self._set_labels(self.class_names)

    def _set_labels(self, class_names: list[str]) -> None:
        # Assign through object.__setattr__ so that this does not recurse into the class-name hook below.
        object.__setattr__(self, "id2label", {index: name for index, name in enumerate(class_names)})
        object.__setattr__(self, "label2id", {name: index for index, name in enumerate(class_names)})

    def __setattr__(self, key, value):
        # After construction, class_names, id2label and label2id stay views of one list of names, because the heads
        # were built from class_names and pipelines report id2label. Passing any of them to from_pretrained renames
        # the classes.
        if getattr(self, "_post_init_done", False) and value is not None and getattr(self, "class_names", None):
            if key == "class_names":
                names = check_class_names(value)
                if len(names) != len(self.class_names):
                    raise ValueError(
                        f"class_names lists {len(names)} classes, but the heads have {len(self.class_names)}. Pass "
                        "one new name per class, in order, to rename them. To classify other classes, build a new "
                        "model from the endpoints with DaWinCLIPModel.from_pretrained_pair."
                    )
            elif key == "id2label":
                names = class_names_from_id2label(value, len(self.class_names))
            elif key == "label2id":
                names = class_names_from_label2id(value, len(self.class_names))
            else:
                names = None
            if names is not None:
                object.__setattr__(self, "class_names", names)
                self._set_labels(names)
                return
        super().__setattr__(key, value)

    @property
    def num_classes(self) -> int:
        """Number of classes of the heads."""
        return len(self.class_names or [])
