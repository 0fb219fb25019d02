"""Checkpoint loading helpers: stored dtypes, the common dtype, and when the safetensors advice is given."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from hf_dawin.loading import common_dtype, safetensors_hint, safetensors_only, stored_dtype

from .conftest import make_clip


@pytest.mark.parametrize(
    ("stored", "from_path", "expected"),
    [
        ({"zero-shot": torch.float32, "fine-tuned": torch.float16}, {"zero-shot": True, "fine-tuned": True}, torch.float32),
        ({"zero-shot": torch.float16, "fine-tuned": torch.bfloat16}, {"zero-shot": True, "fine-tuned": True}, torch.float32),
        ({"zero-shot": torch.float16, "fine-tuned": torch.float16}, {"zero-shot": True, "fine-tuned": True}, None),
        ({"zero-shot": torch.float32, "fine-tuned": None}, {"zero-shot": True, "fine-tuned": True}, None),
        # Only a loaded model would change, and loaded models keep their dtype.
        ({"zero-shot": torch.float32, "fine-tuned": torch.float16}, {"zero-shot": True, "fine-tuned": False}, None),
    ],
)
def test_common_dtype(stored, from_path, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_dawin.loading"):
        assert common_dtype(stored, from_path) == expected
    assert ("every endpoint loaded from a path is loaded in float32" in caplog.text) == (expected is not None)


def test_stored_dtype_sources(tmp_path):
    assert stored_dtype(make_clip(0).to(torch.bfloat16), None, {}) == torch.bfloat16
    assert stored_dtype("unused", {"torch_dtype": "float16"}, {}) == torch.float16
    assert stored_dtype("unused", {"dtype": "float32", "torch_dtype": "float16"}, {}) == torch.float32
    # No dtype in config.json: the safetensors header of the weights decides.
    save_file({"a": torch.zeros(2, dtype=torch.float16), "steps": torch.zeros(1, dtype=torch.int64)}, tmp_path / "model.safetensors")
    assert stored_dtype(tmp_path, {}, {}) == torch.float16
    (tmp_path / "model.safetensors").unlink()
    assert stored_dtype(tmp_path, {}, {}) is None


def test_stored_dtype_reads_the_first_shard(tmp_path):
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2, dtype=torch.bfloat16)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert stored_dtype(tmp_path, {}, {}) == torch.bfloat16


def test_hint_needs_pickled_weights(tmp_path):
    error = OSError("Error no file named model.safetensors found in directory")
    kwargs = safetensors_only({})
    assert kwargs == {"use_safetensors": True}
    assert safetensors_only({"use_safetensors": None}) == {"use_safetensors": None}

    assert safetensors_hint(error, kwargs, tmp_path) == ""  # a folder without pickled weights
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "read its pytorch_model.bin" in safetensors_hint(error, kwargs, tmp_path)
    # A Hub id that is not in the cache may or may not have pickled weights, so the advice is conditional.
    assert "a pytorch_model.bin, if it has one," in safetensors_hint(error, kwargs, "my-org/not-cached")
    # No advice when the caller already allowed pickles or the error is about something else.
    assert safetensors_hint(error, {"use_safetensors": None}, tmp_path) == ""
    assert safetensors_hint(OSError("config.json not found"), kwargs, tmp_path) == ""
