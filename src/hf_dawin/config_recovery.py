"""Config loading that first restores a local folder which a killed save left half-replaced.

transformers' Auto classes and pipelines read config.json with `PreTrainedConfig.get_config_dict`, before any code of
the model class runs, and then build the config with the class's `from_dict`, passing the folder as `name_or_path`.
A save killed with SIGKILL during its moves leaves a folder that mixes the files of two saves (see
`hf_dawin.saving`). The mixin below puts the previous files back before the config is read, or, on the Auto path,
reads config.json again after putting them back, so that the keyword arguments of the call apply to the restored
config.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedConfig
from transformers.utils import CONFIG_NAME

from .saving import recover_interrupted_save


__all__ = ["RecoveringConfigMixin"]


def _recover_local(source, subfolder: str | None = None) -> bool:
    """Restore `source` (plus `subfolder`) if it is a local folder left half-replaced; return whether it was."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    folder = Path(source).expanduser() / (subfolder or "")
    return folder.is_dir() and recover_interrupted_save(folder)


class RecoveringConfigMixin:
    """Restore a half-replaced local folder before its config.json is read. Mix in before `PreTrainedConfig`."""

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        _recover_local(pretrained_model_name_or_path, kwargs.get("subfolder"))
        return super().get_config_dict(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # The Auto classes pass the folder whose config.json they read as `name_or_path`.
        source = kwargs.get("name_or_path")
        if _recover_local(source):
            if not (Path(source).expanduser() / CONFIG_NAME).is_file():
                raise OSError(
                    f"A save into {source} was killed while it moved its files in. It was the first save into that "
                    f"folder, so its files have been removed and no {CONFIG_NAME} is left: save the model again."
                )
            config_dict, _ = PreTrainedConfig.get_config_dict(source)
            if config_dict.get("model_type") != cls.model_type:
                raise OSError(
                    f"A save into {source} was killed while it moved its files in, so the model class was chosen from "
                    f"a half-replaced config.json. The previous files have been put back, and their config.json is "
                    f"of model type {config_dict.get('model_type')!r}, not {cls.model_type!r}: load the model again."
                )
        return super().from_dict(config_dict, **kwargs)
