"""Metric modules for the `evaluate` library, bundled so that they load by path without Hub access.

Each subfolder contains one module (`accuracy/accuracy.py`, `f1/f1.py`). `evaluate.load` copies and
imports it from its path, so the subfolders are data files of the package, not Python packages.
Load them with `hf_dawin.scoring.load_metric(name)`.
"""

__all__: list[str] = []
