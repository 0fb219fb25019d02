"""Saved DaWin models load with `trust_remote_code=True` where hf_dawin cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import get_relative_import_files

import hf_dawin.modeling_dawin
from hf_dawin import DaWinCLIPModel

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, TINY_TEMPLATES


# Runs before anything else in the child interpreter: hf_dawin, and the packages it installs that transformers
# does not require, fail to import as if they were not installed.
BLOCK_HF_DAWIN = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {"hf_dawin", "scipy", "sklearn", "threadpoolctl", "matplotlib", "datasets", "evaluate"}

    class HideBlocked(importlib.abc.MetaPathFinder):
        # Wraps each import finder, so that imports and availability checks (importlib.util.find_spec) alike
        # find nothing for a blocked package.
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, name):
            # invalidate_caches, find_distributions (importlib.metadata) and the like go to the wrapped finder.
            return getattr(self.finder, name)

    sys.meta_path[:] = [HideBlocked(finder) for finder in sys.meta_path]
    """
)

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib
    import json
    import sys

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForImageClassification, pipeline

    model_dir, work_dir = sys.argv[1], sys.argv[2]
    report = {}
    report["importable"] = {}
    for name in ("hf_dawin", "scipy", "sklearn"):
        try:
            importlib.import_module(name)
            report["importable"][name] = True
        except ImportError:
            report["importable"][name] = False

    try:
        AutoModelForImageClassification.from_pretrained(model_dir)
        report["without_trust"] = "loaded"
    except ValueError as error:
        report["without_trust"] = str(error)

    model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True)
    report["class_module"] = type(model).__module__
    report["processor"] = type(model.processor).__name__
    pixel_values = load_file(f"{work_dir}/inputs.safetensors")["pixel_values"]
    with torch.no_grad():
        sample = model(pixel_values=pixel_values).logits
        static = model(pixel_values=pixel_values, mode="static", alpha=0.3).logits
        mixture = model(pixel_values=pixel_values, mode="mixture").logits
        base = AutoModel.from_pretrained(model_dir, trust_remote_code=True)(pixel_values=pixel_values).logits
    save_file({"sample": sample, "static": static, "mixture": mixture, "auto_model": base}, f"{work_dir}/remote_logits.safetensors")

    classifier = pipeline("image-classification", model=model_dir, trust_remote_code=True)
    report["pipeline"] = classifier(Image.open(f"{work_dir}/image.png"), top_k=4)

    # The bundled template files are absent beside the copied modules, so the default set falls back.
    package = type(model).__module__.rsplit(".", 1)[0]
    report["templates"] = importlib.import_module(f"{package}.templates").load_templates()
    report["modules"] = sorted(name for name in sys.modules if "dawin" in name)

    # Fitting a mixture needs scikit-learn, which is hidden: the error comes before the config changes.
    try:
        model.calibrate([pixel_values])
        report["calibrate"] = "fitted"
    except ImportError as error:
        report["calibrate"] = str(error)
    report["statistics_after_failed_calibrate"] = model.config.entropy_statistics
    model.calibrate([pixel_values], fit_mixture=False)
    report["statistics_after_calibrate"] = model.config.entropy_statistics is not None
    with open(f"{work_dir}/report.json", "w") as handle:
        json.dump(report, handle)
    """
)


def _run_without_hf_dawin(script: str, model_dir, work_dir) -> subprocess.CompletedProcess:
    """Run `script` with arguments `model_dir work_dir` in a Python process where hf_dawin cannot be imported."""
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(work_dir / "modules"),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HF_DAWIN + script, str(model_dir), str(work_dir)],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def saved_model(tiny_pair_dirs, tmp_path_factory):
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
    )
    # A fitted mixture: predicting with it must work without SciPy and scikit-learn, which fitting uses.
    model.fit_mixture(torch.tensor([0.1, 0.15, 0.2, 0.5, 0.55, 0.6, 0.85, 0.9, 0.95]), n_components=3)
    directory = tmp_path_factory.mktemp("remote_code") / "tiny-dawin"
    model.save_pretrained(directory)
    return model, directory


def test_save_writes_auto_map(saved_model):
    _, directory = saved_model
    config = json.loads((directory / "config.json").read_text())

    assert config["auto_map"] == {
        "AutoConfig": "configuration_dawin.DaWinCLIPConfig",
        "AutoModel": "modeling_dawin.DaWinCLIPModel",
        "AutoModelForImageClassification": "modeling_dawin.DaWinCLIPModel",
    }


def test_save_copies_every_relative_import(saved_model):
    _, directory = saved_model
    module_file = Path(hf_dawin.modeling_dawin.__file__)
    needed = {module_file.name} | {Path(path).name for path in get_relative_import_files(module_file)}

    copied = {path.name for path in directory.glob("*.py")}

    assert {"configuration_dawin.py", "mixture.py", "interpolation.py", "templates.py"} <= needed
    assert needed <= copied
    # The Hub upload code is imported by absolute name only, so it stays out of the remote-code files.
    assert "hub.py" not in copied
    assert "evaluation.py" not in copied


def test_remote_code_without_hf_dawin(saved_model, tmp_path):
    model, directory = saved_model
    generator = torch.Generator().manual_seed(11)
    pixel_values = torch.randn(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")

    completed = _run_without_hf_dawin(REMOTE_SCRIPT, directory, tmp_path)

    assert completed.returncode == 0, completed.stderr[-3000:]
    # transformers logs an error when a pipeline's model class is not registered for the task.
    assert "is not supported for" not in completed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["importable"] == {"hf_dawin": False, "scipy": False, "sklearn": False}
    assert report["class_module"].startswith("transformers_modules.")
    assert not [name for name in report["modules"] if name.startswith("hf_dawin")]
    assert "trust_remote_code=True" in report["without_trust"]
    assert report["processor"] == "CLIPProcessor"
    assert report["templates"] == ["a photo of a {}."]
    assert "these modules are missing: sklearn, threadpoolctl" in report["calibrate"]
    assert "fit_mixture=False" in report["calibrate"]
    assert report["statistics_after_failed_calibrate"] is None
    assert report["statistics_after_calibrate"] is True

    remote = load_file(tmp_path / "remote_logits.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(remote["sample"], model(pixel_values=pixel_values).logits)
        torch.testing.assert_close(remote["static"], model(pixel_values=pixel_values, mode="static", alpha=0.3).logits)
        torch.testing.assert_close(remote["mixture"], model(pixel_values=pixel_values, mode="mixture").logits)
        torch.testing.assert_close(remote["auto_model"], model(pixel_values=pixel_values).logits)
        expected = model(**model.image_processor(images=image, return_tensors="pt")).logits[0].softmax(-1)
    scores = {prediction["label"]: prediction["score"] for prediction in report["pipeline"]}
    for index, name in enumerate(TINY_CLASS_NAMES):
        assert scores[name] == pytest.approx(float(expected[index]), abs=1e-5)


MULTITASK_REMOTE_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageClassification, pipeline

    model_dir, work_dir = sys.argv[1], sys.argv[2]
    model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True)
    pixel_values = load_file(f"{work_dir}/inputs.safetensors")["pixel_values"]
    with torch.no_grad():
        logits = {
            f"{task}_{mode}": model(pixel_values=pixel_values, task=task, mode=mode).logits
            for task in model.config.tasks
            for mode in ("sample", "task_arithmetic")
        }
    save_file(logits, f"{work_dir}/remote_logits.safetensors")
    classifier = pipeline("image-classification", model=model_dir, trust_remote_code=True)
    report = {
        "class_module": type(model).__module__,
        "processor": type(model.processor).__name__,
        "pipeline": classifier(Image.open(f"{work_dir}/image.png"), top_k=4),
        "modules": sorted(name for name in sys.modules if "dawin" in name),
    }
    with open(f"{work_dir}/report.json", "w") as handle:
        json.dump(report, handle)
    """
)


def test_multitask_remote_code_without_hf_dawin(tiny_processor, tmp_path):
    from hf_dawin import DaWinMultiTaskCLIPModel

    from .conftest import make_clip

    pretrained = make_clip(0)
    fine_tuned = [make_clip(40 + index, base=pretrained, noise=0.3) for index in range(2)]
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, fine_tuned, tasks={"animals": list(TINY_CLASS_NAMES), "colours": ["red", "green", "blue"]},
        templates=TINY_TEMPLATES, processor=tiny_processor,
    )  # fmt: skip
    directory = tmp_path / "multi-dawin"
    model.save_pretrained(directory)
    assert "hub_multitask.py" not in {path.name for path in directory.glob("*.py")}
    pixel_values = torch.randn(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(12))
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")

    completed = _run_without_hf_dawin(MULTITASK_REMOTE_SCRIPT, directory, tmp_path)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "is not supported for" not in completed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["class_module"].startswith("transformers_modules.")
    assert not [name for name in report["modules"] if name.startswith("hf_dawin")]
    assert report["processor"] == "CLIPProcessor"
    remote = load_file(tmp_path / "remote_logits.safetensors")
    with torch.no_grad():
        for task in ("animals", "colours"):
            for mode in ("sample", "task_arithmetic"):
                expected = model(pixel_values=pixel_values, task=task, mode=mode).logits
                torch.testing.assert_close(remote[f"{task}_{mode}"], expected)
        expected = model(**model.image_processor(images=image, return_tensors="pt")).logits[0].softmax(-1)
    scores = {prediction["label"]: prediction["score"] for prediction in report["pipeline"]}
    for index, name in enumerate(TINY_CLASS_NAMES):
        assert scores[name] == pytest.approx(float(expected[index]), abs=1e-5)
