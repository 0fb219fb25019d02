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
from .interpolation import build_mixed_module, interpolate_state_dicts, merge_task_vectors
from .mixture import BetaMixture
from .modeling_dawin import DaWinCLIPModel, DaWinImageClassifierOutput
from .temperature import fit_temperatures


__version__ = "0.1.0"

__all__ = [
    "MODES",
    "BetaMixture",
    "DaWinCLIPConfig",
    "DaWinCLIPModel",
    "DaWinImageClassifierOutput",
    "EntropyStatistics",
    "build_mixed_module",
    "compute_coefficients",
    "entropy",
    "entropy_statistics",
    "fit_temperatures",
    "interpolate_state_dicts",
    "merge_task_vectors",
    "oracle_coefficients",
    "output_ensemble_probabilities",
]

AutoConfig.register(DaWinCLIPConfig.model_type, DaWinCLIPConfig, exist_ok=True)
AutoModel.register(DaWinCLIPConfig, DaWinCLIPModel, exist_ok=True)
AutoModelForImageClassification.register(DaWinCLIPConfig, DaWinCLIPModel, exist_ok=True)
