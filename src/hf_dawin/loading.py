"""Loading of CLIP checkpoints for DaWin: safetensors only unless requested, one dtype, readable load reports.

`CLIPModel.from_pretrained` falls back to a pickled `pytorch_model.bin` when a checkpoint has no safetensors
file, and loads each checkpoint in the dtype it was saved in. DaWin models read weights from safetensors files
only unless the caller asks otherwise, and load endpoints saved in different dtypes in one dtype, so that their
weights can be interpolated.

The model classes load their endpoints with [`load_endpoints`], which checks each source before it downloads
anything: a local folder must exist, a folder that a killed save left half-replaced gets its previous files
back, and a Hub id needs a Hub that responds.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from transformers import CLIPModel, CLIPProcessor, PreTrainedConfig
from transformers.utils import CONFIG_NAME, logging

from .hub_access import check_hub_reachable, in_hub_cache
from .interpolation import format_listed
from .placement import (
    check_devices_available,
    check_max_memory_devices,
    check_module_device_map,
    prepare_endpoint,
    remaining_memory,
    resolve_dtype,
)
from .saving import recover_interrupted_save


logger = logging.get_logger(__name__)

__all__ = [
    "check_source_loadable",
    "common_dtype",
    "held_load_reports",
    "load_endpoints",
    "load_processor",
    "log_load_reports",
    "recover_local_folder",
    "safetensors_hint",
    "safetensors_only",
    "saved_config_dict",
    "saved_model_load_error",
    "stored_dtype",
    "try_load_processor",
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


# ----------------------------------------------------------------------------------------------------------
# Endpoints, saved models and processors
# ----------------------------------------------------------------------------------------------------------


def check_local_folder(source, writer: str) -> None:
    """Raise if `source` is written as a local path (absolute, or starting with `.` or `~`) that does not exist.

    Such a string cannot be a Hub id, and huggingface_hub would otherwise report it as a malformed repository id.

    Raises:
        FileNotFoundError: Naming the folder and `writer`, the method that writes such folders.
    """
    if not isinstance(source, (str, Path)):
        return
    text = str(source)
    looks_local = isinstance(source, Path) or os.path.isabs(text) or text.startswith((".", "~"))
    if looks_local and not Path(text).expanduser().exists():
        raise FileNotFoundError(
            f"No folder at {text!r}. Pass an existing folder written by {writer}, or a Hub id such as "
            "'namespace/name'."
        )


def recover_local_folder(source, load_kwargs: Mapping) -> None:
    """Put back the previous files of a local folder that a killed save left half-replaced, before it loads.

    The Auto classes and pipelines restore the folder while they build the config (see
    `hf_dawin.config_recovery`), so their config already comes from the restored config.json.

    Raises:
        OSError: If putting the files back changed config.json while a config read before was passed in
            `load_kwargs["config"]`. Loading again reads the restored folder.
    """
    if not isinstance(source, (str, Path)):
        return
    folder = Path(str(source)).expanduser() / (load_kwargs.get("subfolder") or "")
    if not folder.is_dir():
        return
    passed_from = _read_config_file(folder) if isinstance(load_kwargs.get("config"), PreTrainedConfig) else None
    if not recover_interrupted_save(folder) or passed_from is None:
        return
    if _read_config_file(folder) != passed_from:
        raise OSError(
            f"A save into {folder} was killed while it moved its files in, and the config passed to from_pretrained "
            "was read from the half-replaced folder. The previous files have been put back: load the config and "
            "the model again."
        )


def _read_config_file(folder: Path) -> dict | None:
    """Return the parsed config.json of `folder`, or None if it is missing or not a JSON object."""
    try:
        parsed = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None


def check_source_loadable(source, writer: str, load_kwargs: Mapping) -> None:
    """Raise at once if `source` is a missing local folder, or a Hub id to download while the Hub does not respond.

    `writer` names the method that writes such folders, for the message. A local folder that a killed save left
    half-replaced gets its previous files back first (see [`recover_local_folder`]).
    """
    check_local_folder(source, writer)
    recover_local_folder(source, load_kwargs)
    check_hub_reachable(
        source,
        cache_dir=load_kwargs.get("cache_dir"),
        local_files_only=load_kwargs.get("local_files_only", False),
    )


def saved_model_load_error(error: OSError, source, load_kwargs: Mapping, description: str, writer: str) -> OSError:
    """Return the error for a saved DaWin model that failed to load: the reason and what to pass instead.

    `description` names what was loaded (for example "a DaWin model") and `writer` the method that saves it.
    """
    return OSError(
        f"Could not load {description} from {str(source)!r}: {_load_error_text(error, source, load_kwargs)}."
        f"{safetensors_hint(error, load_kwargs, source) or _offline_note()} Pass a folder written by {writer} or a "
        "Hub id reachable from this machine."
    )


def saved_config_dict(source, load_kwargs: dict) -> dict:
    """Read the config.json of a local folder or Hub repository with the Hub arguments of `load_kwargs`."""
    names = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
    config_dict, _ = PreTrainedConfig.get_config_dict(
        str(source), **{name: load_kwargs[name] for name in names if name in load_kwargs}
    )
    return config_dict


def _check_clip_model_type(source, name: str, model_type: str | None) -> None:
    """Raise a ValueError if an endpoint's saved config is not a CLIP config.

    transformers would otherwise build a CLIPModel from defaults and fail on weight shapes, or initialise the
    missing weights randomly with only a logged report.
    """
    if model_type in ("clip", None):
        return
    if model_type == "dawin_clip":
        hint = (
            "It holds a saved DaWin model: load it with DaWinCLIPModel.from_pretrained, or pass the CLIP "
            "checkpoints it was built from."
        )
    elif model_type == "dawin_multitask_clip":
        hint = (
            "It holds a saved multi-task DaWin model: load it with DaWinMultiTaskCLIPModel.from_pretrained, or "
            "pass the CLIP checkpoints it was built from."
        )
    else:
        hint = "Pass a complete CLIP checkpoint saved with CLIPModel.save_pretrained, vision and text towers included."
    raise ValueError(
        f"The {name} endpoint at {str(source)!r} has model_type {model_type!r}, but an endpoint must be a CLIPModel "
        f"checkpoint (model_type 'clip'). {hint}"
    )


def _check_complete_checkpoint(source, name: str, missing_keys: Sequence[str]) -> None:
    """Raise a ValueError if loading an endpoint left CLIP weights missing, which transformers initialises randomly."""
    if not missing_keys:
        return
    listed = format_listed(missing_keys, limit=8)
    raise ValueError(
        f"The {name} endpoint at {str(source)!r} lacks {len(missing_keys)} CLIPModel weights, which would be "
        f"initialised randomly: {listed}. Pass a complete CLIP checkpoint saved with CLIPModel.save_pretrained, "
        "vision and text towers included."
    )


def _endpoint_load_error(error: OSError, endpoint, name: str, load_kwargs: dict) -> OSError:
    advice = safetensors_hint(error, load_kwargs, endpoint) or (
        f"{_offline_note()} Pass a local directory saved with CLIPModel.save_pretrained, a Hub id reachable from "
        "this machine, or a loaded CLIPModel."
    )
    return OSError(f"Could not load the {name} endpoint from {str(endpoint)!r}: {_load_error_text(error, endpoint, load_kwargs)}.{advice}")


def _read_endpoint_config(endpoint, name: str, load_kwargs: dict) -> dict | None:
    """Check that an endpoint can be loaded and return its saved config (None for a loaded `CLIPModel`).

    Raises:
        FileNotFoundError: If a local path does not exist.
        ConnectionError: If a Hub id must be downloaded and the Hub does not respond.
        OSError: If the config cannot be read.
        ValueError: If the config is not a CLIP config.
        TypeError: If the endpoint is neither a path, a Hub id nor a `CLIPModel`.
    """
    if isinstance(endpoint, CLIPModel):
        return None
    if not isinstance(endpoint, (str, Path)):
        raise TypeError(
            f"The {name} endpoint must be a Hub id, a local directory or a transformers.CLIPModel, received "
            f"{type(endpoint).__name__}."
        )
    check_source_loadable(endpoint, f"CLIPModel.save_pretrained (the {name} endpoint)", load_kwargs)
    try:
        config_dict = saved_config_dict(endpoint, load_kwargs)
    except OSError as error:
        raise _endpoint_load_error(error, endpoint, name, load_kwargs) from error
    _check_clip_model_type(endpoint, name, config_dict.get("model_type"))
    return config_dict


def _load_endpoint(endpoint, name: str, load_kwargs: dict) -> tuple[CLIPModel, str | None]:
    """Load one endpoint checked by `_read_endpoint_config`; return it with its Hub id or path."""
    if isinstance(endpoint, CLIPModel):
        return endpoint, getattr(endpoint.config, "_name_or_path", None) or None
    try:
        with held_load_reports() as reports:
            model, loading_info = CLIPModel.from_pretrained(str(endpoint), output_loading_info=True, **load_kwargs)
    except OSError as error:
        raise _endpoint_load_error(error, endpoint, name, load_kwargs) from error
    except RuntimeError as error:
        if "mismatched_sizes" not in str(error):
            raise
        raise ValueError(
            f"The {name} endpoint at {str(endpoint)!r} contains weights whose shapes differ from its config.json. The "
            "load report above lists them as MISMATCH. Pass a checkpoint whose config.json describes its weights."
        ) from error
    _check_complete_checkpoint(endpoint, name, sorted(loading_info["missing_keys"]))
    # Complete checkpoint: other findings, such as unexpected keys, are still worth reading.
    log_load_reports(reports)
    return model, str(endpoint)


def load_endpoints(
    entries: Sequence[tuple[str, str | Path | CLIPModel, str | dict | torch.device | None]],
    *,
    dtype: torch.dtype | None,
    load_kwargs: dict,
) -> list[tuple[CLIPModel, str | None]]:
    """Load CLIP endpoints one after another and check that each can run where it was placed.

    The endpoints share the caller's `max_memory` budget: each one is loaded with what the endpoints before it
    left. A `CLIPModel` passed in more than once is copied, because one module in two places would share its
    tensors, which safetensors cannot save.

    Args:
        entries (`Sequence[tuple]`): `(name, endpoint, device_map)` per endpoint, for example
            `("zero-shot", "openai/clip-vit-base-patch32", None)`. The name appears in messages.
        dtype (`torch.dtype`, *optional*): The dtype to load or cast every endpoint to.
        load_kwargs (`dict`): Further arguments of `CLIPModel.from_pretrained`, `max_memory` included.

    Returns:
        `list[tuple[CLIPModel, str | None]]`: Each endpoint with its Hub id or path, in the order of `entries`.
    """
    load_kwargs = safetensors_only(load_kwargs)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    # transformers rewrites max_memory in place, so every load gets its own copy of the budget.
    budget = dict(load_kwargs.get("max_memory") or {})
    loaded: list[tuple[CLIPModel, str | None]] = []
    check_max_memory_devices(budget, "endpoints")
    config_dicts = {}
    for name, endpoint, device_map in entries:
        check_module_device_map(device_map, f"{name} endpoint")
        check_devices_available(device_map, f"{name} endpoint")
        config_dicts[name] = _read_endpoint_config(endpoint, name, load_kwargs)
    if dtype is None and load_kwargs.get("torch_dtype") is not None:
        # The older name of `dtype`: transformers ignores it once `dtype` is set below.
        dtype = resolve_dtype(load_kwargs.pop("torch_dtype"))
        load_kwargs["dtype"] = dtype
    if dtype is None:
        # transformers loads each checkpoint in the dtype it was saved in. Endpoints saved in different dtypes
        # are loaded in one dtype instead, so that their weights can be interpolated.
        # NOTE: a checkpoint whose config.json names no dtype and that has no readable safetensors header (pickled
        # weights only) has no known dtype here, so it is not promoted. If its dtype differs, the architecture
        # check raises and names dtype= as the fix.
        common = common_dtype(
            {name: stored_dtype(endpoint, config_dicts[name], load_kwargs) for name, endpoint, _ in entries},
            {name: config_dicts[name] is not None for name, _, _ in entries},
        )
        if common is not None:
            load_kwargs["dtype"] = common
    for position, (name, endpoint, device_map) in enumerate(entries):
        kwargs = load_kwargs if device_map is None else {**load_kwargs, "device_map": device_map}
        if budget:
            kwargs = {**kwargs, "max_memory": dict(budget)}
        endpoint_model, source = _load_endpoint(endpoint, name, kwargs)
        limits_note = ""
        if position > 0 and budget:
            earlier_names = ", ".join(entry[0] for entry in entries[:position])
            plural = "s" if position > 1 else ""
            limits_note = f" (max_memory left after the {earlier_names} endpoint{plural})"
        endpoint_model = prepare_endpoint(
            endpoint_model, f"{name} endpoint{limits_note}", dtype=dtype, device_map=device_map,
            max_memory=budget, loaded_here=not isinstance(endpoint, CLIPModel),
        )  # fmt: skip
        if budget:
            budget = remaining_memory(budget, endpoint_model)
        if any(endpoint_model is loaded_model for loaded_model, _ in loaded):
            logger.info("The same CLIPModel was given again as the %s endpoint, so that endpoint is a copy.", name)
            endpoint_model = copy.deepcopy(endpoint_model)
        loaded.append((endpoint_model, source))
    return loaded


def _load_error_text(error: OSError, source, load_kwargs: dict | None = None) -> str:
    """Return the reason of a failed load in one sentence, without transformers' advice to check the connection.

    In offline mode a source that is neither a local folder nor in the Hub cache was looked up in the cache only,
    so "check your internet connection" would mislead.
    """
    if (
        huggingface_hub.constants.is_offline_mode()
        and not Path(str(source)).expanduser().exists()
        and not in_hub_cache(str(source), "model", (load_kwargs or {}).get("cache_dir"))
    ):
        return "it is not a local folder, and the Hub cache has no copy of it"
    return " ".join(str(error).split()).rstrip(".")


def _offline_note() -> str:
    if not huggingface_hub.constants.is_offline_mode():
        # Without a connection, huggingface_hub retries each request before it fails.
        return " On a machine without internet access, set HF_HUB_OFFLINE=1 so that Hub lookups fail at once."
    return " Offline mode is on (HF_HUB_OFFLINE=1), so only local folders and files already in the Hub cache load."


def load_processor(source, model: CLIPModel) -> CLIPProcessor | None:
    candidates = [source] if isinstance(source, (str, Path)) else []
    name_or_path = getattr(model.config, "_name_or_path", "")
    if name_or_path:
        candidates.append(name_or_path)
    for candidate in candidates:
        processor = try_load_processor(candidate, {})
        if processor is not None:
            return processor
    logger.warning(
        "No CLIPProcessor was found beside the zero-shot endpoint; pass processor= to build zero-shot heads and "
        "to use the model in pipelines."
    )
    return None


def try_load_processor(name_or_path, kwargs: dict) -> CLIPProcessor | None:
    hub_kwargs = {
        key: kwargs[key]
        for key in ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code")
        if key in kwargs
    }
    try:
        return CLIPProcessor.from_pretrained(str(name_or_path), **hub_kwargs)
    except (OSError, ValueError, TypeError):
        try:
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(str(name_or_path), **hub_kwargs)
        except (OSError, ValueError, TypeError):
            return None
