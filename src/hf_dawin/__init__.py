"""DaWin: training-free dynamic weight interpolation of CLIP checkpoints for Hugging Face transformers.

Importing the package registers [`DaWinCLIPConfig`] and [`DaWinCLIPModel`] with `AutoConfig`, `AutoModel` and
`AutoModelForImageClassification`, so saved DaWin models load with the Auto classes and pipelines.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .coefficients import (
    EntropyStatistics,
    compute_coefficients,
    entropy,
    entropy_statistics,
    oracle_coefficients,
    output_ensemble_probabilities,
)
from .configuration_dawin import MODES, DaWinCLIPConfig
from .configuration_multitask import MULTITASK_MODES, DaWinMultiTaskCLIPConfig
from .interpolation import build_mixed_module, interpolate_state_dicts, merge_task_vectors
from .merging import ties_merge_state_dicts
from .mixture import BetaMixture
from .modeling_dawin import DaWinCLIPModel, DaWinImageClassifierOutput
from .modeling_multitask import (
    DaWinMultiTaskCLIPModel,
    DaWinMultiTaskImageClassifierOutput,
    coefficients_from_task_weights,
    task_weights_from_entropies,
)
from .temperature import fit_temperature, fit_temperatures, reference_temperatures


__version__ = "0.1.0"

__all__ = [
    "MODES",
    "MULTITASK_MODES",
    "BetaMixture",
    "DaWinCLIPConfig",
    "DaWinCLIPModel",
    "DaWinImageClassifierOutput",
    "DaWinMultiTaskCLIPConfig",
    "DaWinMultiTaskCLIPModel",
    "DaWinMultiTaskImageClassifierOutput",
    "EntropyStatistics",
    "build_mixed_module",
    "coefficients_from_task_weights",
    "compute_coefficients",
    "entropy",
    "entropy_statistics",
    "fit_temperature",
    "fit_temperatures",
    "interpolate_state_dicts",
    "merge_task_vectors",
    "oracle_coefficients",
    "output_ensemble_probabilities",
    "reference_temperatures",
    "task_weights_from_entropies",
    "ties_merge_state_dicts",
]

AutoConfig.register(DaWinCLIPConfig.model_type, DaWinCLIPConfig, exist_ok=True)
AutoModel.register(DaWinCLIPConfig, DaWinCLIPModel, exist_ok=True)
AutoModelForImageClassification.register(DaWinCLIPConfig, DaWinCLIPModel, exist_ok=True)
# Registered here rather than in the modeling modules: those are copied beside saved models as remote code, where
# a registration would make transformers reuse the first loaded repository's classes for every later one.
AutoConfig.register(DaWinMultiTaskCLIPConfig.model_type, DaWinMultiTaskCLIPConfig, exist_ok=True)
AutoModel.register(DaWinMultiTaskCLIPConfig, DaWinMultiTaskCLIPModel, exist_ok=True)
AutoModelForImageClassification.register(DaWinMultiTaskCLIPConfig, DaWinMultiTaskCLIPModel, exist_ok=True)
