"""Endpoint placement: which dtypes a device can run, and device maps that keep every weight in memory.

DaWin models run their endpoints in float32, bfloat16 or float16. Entropies, coefficients and the Beta
mixture are always computed in float32 from float32 copies of the logits, so only the CLIP forward passes
run in reduced precision. A dtype that the device cannot run raises a `ValueError` naming the dtype, the
device and what to use instead, rather than an operator error deep inside the vision tower.

Endpoints can be placed with `device_map`, one map for both or one per endpoint. Interpolation reads every
weight of both endpoints, so a map that offloads weights to disk (what `device_map="auto"` does when
`max_memory` is too small) is rejected with the sizes involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .interpolation import format_listed


logger = logging.get_logger(__name__)

__all__ = [
    "ENDPOINT_NAMES",
    "SUPPORTED_DTYPES",
    "cgroup_memory_left",
    "check_devices_available",
    "check_dtype_supported",
    "check_endpoint_in_memory",
    "check_max_memory_devices",
    "check_module_device_map",
    "check_module_precision",
    "free_memory",
    "module_bytes",
    "prepare_endpoint",
    "resolve_dtype",
    "split_device_map",
]

ENDPOINT_NAMES = ("zero_shot", "fine_tuned")
# Top-level modules of a transformers CLIPModel, the valid first parts of a device map's keys.
CLIP_MODULES = ("vision_model", "text_model", "visual_projection", "text_projection", "logit_scale")

SUPPORTED_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# (dtype, device) pairs that passed the check in this process; the probe runs once per pair.
_VERIFIED: set[tuple[torch.dtype, str]] = set()
_FULL_PRECISION = (torch.float32, torch.float64)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Return the `torch.dtype` named by `dtype` (`"bfloat16"`, `"torch.float16"` or a dtype itself).

    Raises:
        ValueError: If `dtype` is not float32, bfloat16, float16 or float64.
    """
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str):
        resolved = SUPPORTED_DTYPES.get(dtype.removeprefix("torch."))
    else:
        resolved = None
    if resolved not in SUPPORTED_DTYPES.values():
        raise ValueError(
            f"Expected dtype float32, bfloat16, float16 or float64 (a torch.dtype or its name), received {dtype!r}."
        )
    return resolved


def _probe(dtype: torch.dtype, device: torch.device) -> None:
    """Run each operator type of a CLIP vision tower once on tiny tensors of `dtype` on `device`."""
    images = torch.randn(1, 3, 4, 4, device=device).to(dtype)
    patches = F.conv2d(images, torch.randn(8, 3, 2, 2, device=device).to(dtype), stride=2)
    tokens = patches.flatten(2).transpose(1, 2)
    tokens = F.layer_norm(tokens, (8,), torch.ones(8, device=device, dtype=dtype), None)
    query = F.linear(tokens, torch.randn(8, 8, device=device).to(dtype)).reshape(1, 4, 2, 4).transpose(1, 2)
    attended = F.scaled_dot_product_attention(query, query, query)
    hidden = torch.sigmoid(1.702 * attended) * attended + F.gelu(attended)
    torch.addcmul(hidden, hidden, hidden).float().log_softmax(dim=-1)


def check_dtype_supported(dtype: torch.dtype | str, device: torch.device | str) -> torch.dtype:
    """Check that `device` can run a CLIP vision tower in `dtype`; return the resolved dtype.

    float32 always passes. bfloat16 on CUDA needs native support (compute capability 8.0 or newer, as
    reported by `torch.cuda.is_bf16_supported(including_emulation=False)`). Every other reduced-precision pair
    runs a tiny probe of the operators the vision tower uses, once per process.

    Args:
        dtype (`torch.dtype` or `str`): The requested dtype.
        device (`torch.device` or `str`): The device the weights live on.

    Returns:
        `torch.dtype`: The resolved dtype.

    Raises:
        ValueError: If the dtype is not supported on the device; the message names both and a fix.
    """
    resolved = resolve_dtype(dtype)
    device = torch.device(device)
    if resolved in _FULL_PRECISION or device.type == "meta":
        return resolved
    key = (resolved, str(device))
    if key in _VERIFIED:
        return resolved

    name = str(resolved).removeprefix("torch.")
    if device.type == "cuda" and resolved == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(
            f"dtype bfloat16 was requested on {device}, but this GPU has no native bfloat16 support "
            "(it needs compute capability 8.0 or newer). Load the endpoints with dtype=torch.float16 or "
            "dtype=torch.float32 instead."
        )
    try:
        with torch.inference_mode():
            _probe(resolved, device)
    except (RuntimeError, NotImplementedError) as error:
        raise ValueError(
            f"dtype {name} is not supported on {device} by this PyTorch build: a CLIP operator failed with "
            f"'{error}'. Use dtype=torch.float32"
            + (" or dtype=torch.bfloat16" if resolved == torch.float16 and device.type == "cpu" else "")
            + ", or move the model to a device that supports it."
        ) from error

    if device.type == "cpu" and resolved == torch.float16 and not _cpu_has_native_float16():
        logger.warning(
            "float16 on this CPU runs through slow fallback kernels (no native float16 support); bfloat16 or "
            "float32 is faster here."
        )
    _VERIFIED.add(key)
    return resolved


def _cpu_has_native_float16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_module_precision(module: nn.Module, name: str = "model") -> None:
    """Check every (dtype, device) pair of the floating-point parameters and buffers of `module`.

    Args:
        module (`nn.Module`): For example an endpoint `CLIPModel`, possibly spread over devices.
        name (`str`): Name of the module in the error message.

    Raises:
        ValueError: If a pair is not supported; the message names `name`.
    """
    pairs = {
        (tensor.dtype, tensor.device)
        for tensor in [*module.parameters(), *module.buffers()]
        if tensor.is_floating_point()
    }
    for dtype, device in sorted(pairs, key=str):
        try:
            check_dtype_supported(dtype, device)
        except ValueError as error:
            raise ValueError(f"The {name} cannot run as loaded: {error}") from error


# ----------------------------------------------------------------------------------------------------------
# Device maps
# ----------------------------------------------------------------------------------------------------------


def split_device_map(device_map: str | dict | torch.device | None) -> dict[str, str | dict | torch.device | None]:
    """Return one device map per endpoint.

    A mapping whose keys are exactly `zero_shot` and `fine_tuned` contains one map per endpoint (for example
    `{"zero_shot": "cuda:0", "fine_tuned": "cuda:1"}`); any other value is used for both endpoints.

    Raises:
        ValueError: If a per-endpoint mapping names only one endpoint or other keys beside them, or a module map
            has keys that are not modules of a CLIPModel.
    """
    if isinstance(device_map, dict) and set(device_map) & set(ENDPOINT_NAMES):
        if set(device_map) != set(ENDPOINT_NAMES):
            raise ValueError(
                "A per-endpoint device_map needs exactly the keys 'zero_shot' and 'fine_tuned', received "
                f"{sorted(device_map)}. Pass one map for both endpoints, or one entry for each."
            )
        maps = {name: device_map[name] for name in ENDPOINT_NAMES}
    else:
        maps = {name: device_map for name in ENDPOINT_NAMES}
    for name, endpoint_map in maps.items():
        check_module_device_map(
            endpoint_map, f"{name.replace('_', '-')} endpoint",
            hint="A DaWin pair also takes one map per endpoint, {'zero_shot': ..., 'fine_tuned': ...}.",
        )  # fmt: skip
    return maps


def check_module_device_map(
    device_map,
    name: str,
    *,
    modules: Sequence[str] = CLIP_MODULES,
    container: str = "a CLIPModel",
    hint: str | None = None,
) -> None:
    """Raise if a module-to-device map has keys that are not modules of the model, such as a misspelt endpoint.

    Args:
        device_map: The map of one endpoint or model; only mappings are checked.
        name (`str`): What is being placed, for the message, for example `"zero-shot endpoint"`.
        modules (`Sequence[str]`): The model's top-level modules, the valid first parts of the keys.
        container (`str`): The model in the message, for example `"a CLIPModel"`.
        hint (`str`, *optional*): A further sentence for the message, about other accepted forms.

    Raises:
        ValueError: Listing the unknown keys and the modules a map may place.
    """
    if not isinstance(device_map, dict):
        return
    unknown = sorted(str(key) for key in device_map if str(key).split(".")[0] not in (*modules, ""))
    if unknown:
        raise ValueError(
            f"device_map of the {name} has keys {unknown}, which are not modules of {container}. A module map "
            f"places modules such as {list(modules)} (or '' for the whole model)." + (f" {hint}" if hint else "")
        )


def _map_devices(device_map) -> list:
    """Return the devices a device map names, or an empty list for a placement strategy such as `"auto"`."""
    if isinstance(device_map, dict):
        return [device for value in device_map.values() for device in _map_devices(value)]
    if device_map is None or (isinstance(device_map, str) and device_map in _STRATEGIES):
        return []
    return [device_map]


def _device_type_available(device_type: str) -> bool:
    """Return whether PyTorch can allocate on devices of this type (`mps`, `xpu`, ...) in this process."""
    if device_type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device_type, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def check_devices_available(device_map, name: str) -> None:
    """Raise if a device map names a device that this machine or PyTorch build does not have.

    Args:
        device_map: A device, a device string, a GPU index or a module-to-device mapping.
        name (`str`): What is being placed, for the message, for example `"zero-shot endpoint"`.

    Raises:
        ValueError: Naming the device and, for CUDA, the devices available.
    """
    for device in _map_devices(device_map):
        _check_device_available(device, f"device_map of the {name}")


def check_max_memory_devices(max_memory: dict | None, name: str) -> None:
    """Raise if `max_memory` budgets memory on a device that this machine or PyTorch build does not have.

    Args:
        max_memory (`dict`, *optional*): Memory budget per device, as `from_pretrained` takes it.
        name (`str`): What is being placed, for the message, for example `"DaWin model"`.

    Raises:
        ValueError: Naming the device and, for CUDA, the devices available.
    """
    for device in max_memory or {}:
        _check_device_available(device, f"max_memory of the {name}")


def _check_device_available(device, argument: str) -> None:
    if str(device) == "disk":
        raise ValueError(
            f"{argument} puts weights on 'disk', but DaWin reads every weight of every endpoint for each batch, so it "
            "cannot run weights offloaded to disk. Map those modules to 'cpu' or a GPU."
        )
    if str(device) == "meta":
        raise ValueError(
            f"{argument} puts weights on 'meta', a device that stores shapes but no values, so DaWin could not compute "
            "with them. Map those modules to 'cpu' or a GPU."
        )
    if str(device) == "cpu":
        return
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument} names {device!r}, which is not a device: {error}.") from None
    if parsed.type != "cuda":
        if not _device_type_available(parsed.type):
            raise ValueError(
                f"{argument} names {device!r}, but this PyTorch build has no available '{parsed.type}' device. "
                "Use 'cpu', 'auto' or a device this machine has."
            )
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (parsed.index is not None and parsed.index >= count):
        available = f"only {count} CUDA device(s) exist" if count else "CUDA is not available in this process"
        raise ValueError(f"{argument} names {device!r}, but {available}. Use 'cpu', 'auto' or an existing device.")


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def module_bytes(module: nn.Module) -> int:
    """Return the bytes held by the parameters and buffers of `module`: what one more copy of it takes."""
    return sum(tensor.numel() * tensor.element_size() for tensor in (*module.parameters(), *module.buffers()))


# Per control-group version: the mount below /sys/fs/cgroup, the limit and usage files, and the memory.stat key
# of file cache that the kernel reclaims before it stops a process at the limit.
_CGROUP_VERSIONS = {
    2: ("", "memory.max", "memory.current", "inactive_file"),
    1: ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def _memory_cgroups(membership: Path) -> list[tuple[int, str]]:
    """Return the version and path of each memory control group listed in a `/proc/<pid>/cgroup` file."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return [(2, "/"), (1, "/")]
    groups = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            groups.append((2, path))
        elif "memory" in controllers.split(","):
            groups.append((1, path))
    return groups


def _left_in_group(folder: Path, version: int) -> int | None:
    """Return the bytes left under the memory limit of one control-group folder, or `None` without a limit."""
    _, limit_name, usage_name, cache_key = _CGROUP_VERSIONS[version]
    try:
        limit = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    # Version 2 writes "max" without a limit, and version 1 a number near 2**63.
    if limit == "max" or not limit.isdigit() or int(limit) >= 2**62:
        return None
    reclaimable = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key and value.strip().isdigit():
                reclaimable = int(value)
    except OSError:
        pass
    return max(int(limit) - max(usage - reclaimable, 0), 0)


def cgroup_memory_left(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Return the bytes left under this process's control-group memory limits, or `None` without a limit.

    Containers and service managers often limit memory below what the host reports as available, and the kernel
    stops a process that exceeds the limit. The process's own group (from `membership`) and each group above it
    are checked, and the smallest room left counts. Inactive file cache, which the kernel reclaims first, counts
    as free. Inside a control-group namespace the process's group is the mount point itself.
    """
    rooms = []
    for version, path in _memory_cgroups(membership):
        mount = root / _CGROUP_VERSIONS[version][0]
        folder = mount / path.lstrip("/")
        if not folder.is_dir():
            folder = mount
        while True:
            room = _left_in_group(folder, version)
            if room is not None:
                rooms.append(room)
            if folder == mount or mount not in folder.parents:
                break
            folder = folder.parent
    return min(rooms) if rooms else None


def free_memory(device: torch.device | str) -> int | None:
    """Return the bytes that can still be allocated on `device`, or `None` where this is not known.

    For `"cpu"` this is the host memory that the OS reports as available (`psutil`), or less under a control
    group's memory limit. For a CUDA device it is the driver's free memory (`torch.cuda.mem_get_info`), so blocks
    that PyTorch has cached but not used count as taken.
    """
    device = torch.device(device)
    if device.type == "cpu":
        import psutil

        available = int(psutil.virtual_memory().available)
        left = cgroup_memory_left()
        return available if left is None else min(available, left)
    if device.type == "cuda" and torch.cuda.is_available():
        # NOTE: untested, because no GPU was available to run this branch.
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def check_endpoint_in_memory(model: nn.Module, name: str, max_memory: dict | None = None) -> None:
    """Raise if a loaded model has weights offloaded to disk or left on the meta device.

    Args:
        model (`nn.Module`): A model loaded with `from_pretrained(..., device_map=...)`.
        name (`str`): Its name in the message, for example `"zero-shot endpoint"`.
        max_memory (`dict`, *optional*): The `max_memory` passed to the loader, quoted in the message.

    Raises:
        ValueError: Naming the offloaded modules, the model's size and `max_memory`.
    """
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted(module for module, device in device_map.items() if str(device) == "disk")
    on_meta = [key for key, tensor in model.state_dict().items() if tensor.device.type == "meta"]
    if not offloaded and not on_meta:
        return
    total = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    placed = {}
    for module, device in device_map.items():
        if str(device) == "disk":
            continue
        prefix = f"{module}." if module else ""
        size = sum(
            tensor.numel() * tensor.element_size()
            for key, tensor in model.state_dict().items()
            if key.startswith(prefix) and tensor.device.type != "meta"
        )
        placed[str(device)] = placed.get(str(device), 0) + size
    from accelerate.utils import convert_file_size_to_int

    # Sizes given as strings ("30MB") are converted to bytes, as transformers converts them before loading, so the
    # DaWin classes and the Auto classes quote the same value.
    limits = ", ".join(
        f"{device}: {_format_bytes(convert_file_size_to_int(limit) if isinstance(limit, str) else limit)}"
        for device, limit in sorted((max_memory or {}).items(), key=str)
    ) or "not set"
    in_memory = ", ".join(f"{device}: {_format_bytes(size)}" for device, size in sorted(placed.items())) or "nothing"
    problem = f"{len(offloaded)} module(s) offloaded to disk ({format_listed(offloaded, limit=5) or 'the whole model'})"
    if not offloaded:
        problem = f"{len(on_meta)} tensor(s) left on the meta device ({format_listed(on_meta, limit=5)})"
    raise ValueError(
        f"The {name} does not fit in the memory its device map allows: it needs {_format_bytes(total)} but "
        f"{problem}; placed in memory: {in_memory}; max_memory: {limits}. DaWin reads every weight of every "
        "endpoint, so it cannot run from disk. Raise max_memory, add a device, or load in a smaller dtype "
        "(dtype=torch.bfloat16 halves the size)."
    )


def remaining_memory(max_memory: dict, model: nn.Module) -> dict:
    """Return the `max_memory` budget left after `model`'s weights: each device's limit minus what it holds.

    Both endpoints of a pair share one budget, so the second endpoint is loaded with what the first left.

    Args:
        max_memory (`dict`): Device (`"cpu"`, a GPU index, `"cuda:N"`, ...) to a byte count or size string.
        model (`nn.Module`): A loaded model.

    Returns:
        `dict`: The same devices with byte counts, never below zero.
    """
    from accelerate.utils import convert_file_size_to_int

    used: dict[str, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        used[str(tensor.device)] = used.get(str(tensor.device), 0) + tensor.numel() * tensor.element_size()
    remaining = {}
    for device, limit in max_memory.items():
        limit = convert_file_size_to_int(limit) if isinstance(limit, str) else int(limit)
        name = f"cuda:{device}" if isinstance(device, int) else str(device)
        remaining[device] = max(limit - used.get(name, 0), 0)
    return remaining


_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _single_device(device_map) -> torch.device | None:
    """Return the device of a map that places a whole model on one device, else `None`."""
    if isinstance(device_map, dict):
        if set(device_map) == {""}:
            device_map = device_map[""]
        else:
            return None
    if isinstance(device_map, str) and device_map in _STRATEGIES:
        return None
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def prepare_endpoint(
    model: nn.Module,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device_map: str | dict | torch.device | None = None,
    max_memory: dict | None = None,
    loaded_here: bool = True,
) -> nn.Module:
    """Bring an endpoint to the requested dtype and placement and check that it can run there.

    A model loaded by `from_pretrained` already has both. A `CLIPModel` passed in by the caller is converted
    in place: cast to `dtype`, and moved when `device_map` names one device. Other maps need the weights to
    be loaded from a path.

    Args:
        model (`nn.Module`): The endpoint `CLIPModel`.
        name (`str`): Its name in messages, for example `"zero-shot endpoint"`.
        dtype (`torch.dtype`, *optional*): The requested dtype.
        device_map (*optional*): The requested placement of this endpoint.
        max_memory (`dict`, *optional*): The `max_memory` given to the loader, quoted in errors.
        loaded_here (`bool`): Whether `model` was just loaded with `dtype` and `device_map`.

    Returns:
        The same model.

    Raises:
        ValueError: If a passed-in model cannot take `device_map`, weights were offloaded to disk, or the
            dtype is not supported on a device the model uses.
    """
    if not loaded_here:
        if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
            model = model.to(dtype)
        if device_map is not None:
            device = _single_device(device_map)
            if device is None:
                raise ValueError(
                    f"device_map={device_map!r} cannot be applied to the {name}, which was passed in as a loaded "
                    "model. Pass its directory or Hub id so that it is loaded with the map, or place it yourself "
                    "and omit device_map."
                )
            model = model.to(device)
    check_endpoint_in_memory(model, name, max_memory)
    check_module_precision(model, name)
    return model
