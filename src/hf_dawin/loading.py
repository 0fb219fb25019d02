"""Loading of CLIP checkpoints for DaWin: safetensors only unless requested, one dtype, readable load reports.

`CLIPModel.from_pretrained` falls back to a pickled `pytorch_model.bin` when a checkpoint has no safetensors
file, and loads each checkpoint in the dtype it was saved in. DaWin models read weights from safetensors files
only unless the caller asks otherwise, and load endpoints saved in different dtypes in one dtype, so that their
weights can be interpolated.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from transformers import CLIPModel
from transformers.utils import logging

from .placement import resolve_dtype


logger = logging.get_logger(__name__)

__all__ = [
    "common_dtype",
    "held_load_reports",
    "log_load_reports",
    "safetensors_hint",
    "safetensors_only",
    "stored_dtype",
]

# Floating-point dtypes as the safetensors header names them.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_file(source, filename: str, hub_kwargs: Mapping) -> Path | None:
    """Return the path of `filename` in a local folder or in a Hub repository already cached, without downloading."""
    subfolder = hub_kwargs.get("subfolder") or ""
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        path = folder / subfolder / filename
        return path if path.is_file() else None
    try:
        cached = try_to_load_from_cache(
            str(source), f"{subfolder}/{filename}" if subfolder else filename,
            cache_dir=hub_kwargs.get("cache_dir"), revision=hub_kwargs.get("revision"),
        )  # fmt: skip
    except ValueError:  # not a valid repository id either
        return None
    return Path(cached) if isinstance(cached, str) else None


# ----------------------------------------------------------------------------------------------------------
# Safetensors only
# ----------------------------------------------------------------------------------------------------------


def safetensors_only(kwargs: Mapping) -> dict:
    """Return `from_pretrained` arguments that load safetensors weights only, unless `use_safetensors` is set.

    Without this, transformers falls back to `pytorch_model.bin`, a pickle, which it reads with
    `torch.load(weights_only=True)`. A pickle is read only when the caller passes `use_safetensors=None` or `False`.
    """
    return {"use_safetensors": True, **kwargs}


def safetensors_hint(error: Exception, kwargs: Mapping, source) -> str:
    """Return the advice for a checkpoint that has pickled weights but no safetensors file, or "" otherwise.

    The advice is given when `source` has a `pytorch_model.bin`, or when only the Hub could tell.
    """
    if kwargs.get("use_safetensors") is not True or "safetensors" not in str(error):
        return ""
    pickled = [_stored_file(source, name, kwargs) for name in PICKLED_WEIGHT_FILES]
    if Path(str(source)).expanduser().is_dir() and not any(pickled):
        return ""
    found = "its pytorch_model.bin" if any(pickled) else "a pytorch_model.bin, if it has one,"
    return (
        f" hf_dawin loads weights from safetensors files only, unless requested otherwise. If you trust this checkpoint, "
        f"let transformers read {found} with torch.load(weights_only=True): pass use_safetensors=None (in "
        "pipeline(): model_kwargs={'use_safetensors': None}, or --allow-torch-load on the command line), or "
        "convert the checkpoint to safetensors."
    )


# ----------------------------------------------------------------------------------------------------------
# Stored dtypes
# ----------------------------------------------------------------------------------------------------------


def _floating_dtype(names) -> torch.dtype | None:
    """Return the one floating-point dtype among safetensors dtype names ("F32", "BF16", ...), or None."""
    floating = {SAFETENSORS_DTYPES[name] for name in names if name in SAFETENSORS_DTYPES}
    return floating.pop() if len(floating) == 1 else None


def _first_shard(index: Path) -> str | None:
    """Return the first weight file that a `model.safetensors.index.json` lists, or None if it lists none."""
    shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return shards[0] if shards else None


def _hub_safetensors_dtype(source, hub_kwargs: Mapping) -> torch.dtype | None:
    """Return the floating-point dtype of a Hub checkpoint's safetensors weights without downloading them.

    huggingface_hub reads the header of the weight file (of the first shard, for a sharded checkpoint) with a
    range request. Returns None offline, with `local_files_only`, or when the header cannot be read.
    """
    if hub_kwargs.get("local_files_only") or huggingface_hub.constants.is_offline_mode():
        return None
    if not isinstance(source, str) or Path(source).expanduser().exists():
        return None
    subfolder = hub_kwargs.get("subfolder") or ""
    api = huggingface_hub.HfApi()
    request = {"repo_id": source, "revision": hub_kwargs.get("revision"), "token": hub_kwargs.get("token")}
    try:
        filename = f"{subfolder}/model.safetensors" if subfolder else "model.safetensors"
        if not api.file_exists(filename=filename, **request):
            index_name = f"{filename}.index.json"
            if not api.file_exists(filename=index_name, **request):
                return None
            cache_dir = hub_kwargs.get("cache_dir")
            index = huggingface_hub.hf_hub_download(filename=index_name, cache_dir=cache_dir, **request)
            shard = _first_shard(Path(index))
            if shard is None:
                return None
            filename = f"{subfolder}/{shard}" if subfolder else shard
        header = api.parse_safetensors_file_metadata(filename=filename, **request)
    except Exception as error:  # noqa: BLE001 - the dtype is a hint, so any failure only skips it
        logger.info("Failed to read the weights' dtype of %s from the Hub, so it is not compared: %s", source, error)
        return None
    return _floating_dtype(header.parameter_count)


def _safetensors_dtype(source, hub_kwargs: Mapping) -> torch.dtype | None:
    """Return the floating-point dtype of a checkpoint's safetensors weights, read from the file header.

    The header is read from a local folder or the local Hub cache, or else from the Hub without downloading the
    weights.
    """
    path = _stored_file(source, "model.safetensors", hub_kwargs)
    if path is None:
        index = _stored_file(source, "model.safetensors.index.json", hub_kwargs)
        if index is None:
            return _hub_safetensors_dtype(source, hub_kwargs)
        try:
            shard = _first_shard(index)
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        path = _stored_file(source, shard, hub_kwargs) if shard else None
        if path is None:
            return _hub_safetensors_dtype(source, hub_kwargs)
    try:
        with safe_open(str(path), framework="pt") as weights:
            names = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    except (OSError, RuntimeError, ValueError):
        return None
    return _floating_dtype(names)


def stored_dtype(endpoint, config_dict: Mapping | None, hub_kwargs: Mapping) -> torch.dtype | None:
    """Return the dtype transformers loads an endpoint in by default.

    That is the dtype of a loaded `CLIPModel`'s parameters, the dtype that config.json names, or, when it names
    none, the dtype of the safetensors weights. None when none of these can be read without a download.
    """
    if isinstance(endpoint, CLIPModel):
        return next((p.dtype for p in endpoint.parameters() if p.is_floating_point()), None)
    name = (config_dict or {}).get("dtype") or (config_dict or {}).get("torch_dtype")
    if isinstance(name, str):
        try:
            return resolve_dtype(name)
        except ValueError:
            return None
    return _safetensors_dtype(endpoint, hub_kwargs)


def common_dtype(stored: Mapping[str, torch.dtype | None], from_path: Mapping[str, bool]) -> torch.dtype | None:
    """Return the dtype to load the endpoints from a path in, when the endpoints are stored in different dtypes.

    The dtype represents every stored dtype exactly: float32 for float16 with bfloat16. Endpoints passed in as
    loaded models keep their dtype. Returns None when the dtypes agree, are unknown, or no endpoint loaded from
    a path would change.

    Args:
        stored (`Mapping[str, torch.dtype | None]`): The stored dtype of each endpoint, by name.
        from_path (`Mapping[str, bool]`): Whether each endpoint is loaded from a path or Hub id.
    """
    known = [value for value in stored.values() if value is not None]
    if len(set(known)) < 2:
        return None
    common = known[0]
    for value in known[1:]:
        common = torch.promote_types(common, value)
    if not any(from_path[name] and value is not None and value != common for name, value in stored.items()):
        return None
    listed = ", ".join(f"{name} {_dtype_name(value)}" for name, value in stored.items() if value is not None)
    logger.warning(
        "The endpoints are stored in different dtypes (%s), so every endpoint loaded from a path is loaded in %s. "
        "Pass dtype= (on the command line: --dtype) to choose another dtype.",
        listed,
        _dtype_name(common),
    )
    return common


# ----------------------------------------------------------------------------------------------------------
# Load reports
# ----------------------------------------------------------------------------------------------------------


def log_load_reports(reports) -> None:
    """Log load reports held back by [`held_load_reports`]."""
    source = logging.get_logger("transformers.modeling_utils")
    for record in reports:
        source.handle(record)


@contextlib.contextmanager
def held_load_reports():
    """Hold back the load reports that transformers logs while the block runs, and yield the list that collects them.

    A report of missing weights ends with advice to train the model, which does not apply to an endpoint: the
    caller raises its own error instead and logs the held reports with [`log_load_reports`] when it does not.
    If the block raises, the reports are logged before the error propagates, because transformers' own errors
    (weights whose shapes differ from config.json) refer to them.
    """
    source = logging.get_logger("transformers.modeling_utils")
    reports = []

    def hold(record) -> bool:
        if "LOAD REPORT" in record.getMessage():
            reports.append(record)
            return False
        return True

    source.addFilter(hold)
    try:
        yield reports
    except BaseException:
        source.removeFilter(hold)
        log_load_reports(reports)
        raise
    finally:
        source.removeFilter(hold)
