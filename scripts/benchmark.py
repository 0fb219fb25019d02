"""Measure the inference cost of every DaWin mode against a single endpoint forward on the same batches.

Example:

    python scripts/benchmark.py --sizes tiny vit-b-32 --batch-size 32 --repeats 5 --threads 1 \
        --output docs/benchmark_results.json --plot docs/benchmark_cpu.png

For each model size the script builds a CLIP pair with random weights, the fine-tuned endpoint being the
zero-shot one plus noise, because cost does not depend on the values. It times, interleaved round by round:

- `forward`: one endpoint's image classifier (vision tower, projection, head), the unit of every ratio;
- `endpoints`: both endpoints, which every dynamic mode runs first to compute its coefficients;
- the modes `sample`, `mixture` (components already built), `static`, `zero_shot` and `output_ensemble`;
- `reference`: the per-sample procedure of the DaWin reference code (copy the CLIP model, load weights
  merged for the sample's coefficient, all but the text transformer's blocks, classify that one image), after
  the same endpoint pass;
- `reference_inplace`: the same per-sample merge done in place into one working copy of the image classifier
  (`torch._foreach_copy_` and `torch._foreach_lerp_`), the fastest form of that procedure.

It also times building the K mixture components and the per-sample mixed classifier, fitting the Beta
mixture on 100,000 coefficients, and measures peak memory in a fresh subprocess per size (see
`--help` of `--memory-batch-sizes`). Results go to a JSON file and a PNG plot.

`--device cuda` runs the same measurements on a GPU, with wall time synchronised and peak memory read from
CUDA's allocator, for example at `--batch-size 256 --dtype bfloat16`. NOTE: this GPU path has not been run;
only the CPU path is tested.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import CLIPConfig, CLIPModel

from hf_dawin import BetaMixture, DaWinCLIPModel
from hf_dawin.interpolation import merge_task_vectors
from hf_dawin.modeling_dawin import CLIPImageClassifier
from hf_dawin.placement import check_devices_available


# Towers of the measured sizes. ViT-B/32 and ViT-L/14 follow OpenAI CLIP, text tower included: the modes never
# run it once heads are built, but the reference procedure copies and merges the whole model.
TINY_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=999)
SIZES = {
    "tiny": dict(
        vision=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4),
        text=TINY_TEXT,
        projection_dim=64,
    ),
    "vit-b-32": dict(
        vision=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        projection_dim=512,
    ),
    "vit-l-14": dict(
        vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        projection_dim=768,
    ),
}
# Weights that the reference procedure copies but does not merge (see `reference_single_image`).
REFERENCE_UNMERGED_PREFIX = "text_model.encoder."
TIMED_MODES = ("forward", "endpoints", "sample", "mixture", "static", "zero_shot", "output_ensemble")
REFERENCE_MODES = ("reference", "reference_image_classifier", "reference_inplace")
# Targets for the ViT-B/32-sized pair at batch 32 on CPU, as ratios to one endpoint forward.
TARGETS = {"sample_ratio_max": 4.6, "mixture_ratio_max": 3.5, "sample_speedup_over_reference_min": 5.0,
           "component_build_ratio_max": 1.0, "mixture_fit_seconds_max": 1.0}
FINE_TUNED_NOISE = 0.02
LOGIT_SCALE = 100.0


@dataclasses.dataclass
class BenchmarkArguments:
    """Command-line arguments of this script; see `--help`."""

    sizes: list[str]
    batch_size: int
    batch_size_for: dict[str, int]
    repeats: int
    warmup: int
    threads: int | None
    dtype: str
    num_classes: int
    n_components: int
    reference_images: int
    mixture_fit_size: int
    memory: bool
    memory_batch_sizes: list[int]
    output: Path
    plot: Path | None
    seed: int
    device: str = "cpu"
    memory_worker: str | None = None


def _size_batch(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in SIZES or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE=BATCH with SIZE in {sorted(SIZES)}, received {text!r}")
    return name, int(value)


def parse_arguments(argv: list[str] | None = None) -> BenchmarkArguments:
    """Parse command-line arguments into `BenchmarkArguments`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "vit-b-32"],
                        help="model sizes to measure (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--batch-size-for", type=_size_batch, action="append", default=[], metavar="SIZE=BATCH",
                        help="batch size for one size, e.g. vit-l-14=4; repeat for several")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds; each round runs every mode once (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's setting). With more than one, CPU time counts "
                             "every thread, waiting included, so the plot and the summary compare wall time instead")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the endpoints (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the heads (default: %(default)s)")
    parser.add_argument("--n-components", type=int, default=3, help="Beta mixture components (default: %(default)s)")
    parser.add_argument("--reference-images", type=int, default=8,
                        help="images run through the per-sample reference procedure; its per-image median is "
                             "scaled to the batch (default: %(default)s)")
    parser.add_argument("--mixture-fit-size", type=int, default=100_000,
                        help="coefficients the Beta mixture is fitted on (default: %(default)s)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurements")
    parser.add_argument("--memory-batch-sizes", type=int, nargs="+", default=[1, 8, 32],
                        help="batch sizes of the forward-versus-sample peak-memory sweep (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("benchmark_results/benchmark.json"),
                        help="JSON file of the results (default: %(default)s)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot (default: the JSON path with .png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and images (default: 0)")
    parser.add_argument("--device", default="cpu",
                        help="device of the pair, for example cuda or cuda:0 (default: %(default)s)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    namespace = parser.parse_args(argv)
    try:
        device = torch.device(namespace.device)
    except RuntimeError as error:
        parser.error(f"--device {namespace.device!r} is not a torch device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {namespace.device} needs CUDA, which this machine does not have; use --device cpu")
    try:
        check_devices_available(namespace.device, "benchmark")
    except ValueError as error:
        parser.error(f"--device {namespace.device}: {error}")
    for name in ("batch_size", "repeats", "num_classes", "n_components", "reference_images", "mixture_fit_size"):
        if getattr(namespace, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, received {getattr(namespace, name)}")
    if namespace.warmup < 0:
        parser.error(f"--warmup must be at least 0, received {namespace.warmup}")
    namespace.batch_size_for = dict(namespace.batch_size_for)
    if namespace.plot is None:
        namespace.plot = namespace.output.with_suffix(".png")
    return BenchmarkArguments(**vars(namespace))


# ----------------------------------------------------------------------------------------------------------
# Model and inputs
# ----------------------------------------------------------------------------------------------------------


def synthetic_coefficients(count: int, seed: int) -> np.ndarray:
    """Draw coefficients from three Beta components, so that every mixture component is used."""
    rng = np.random.default_rng(seed)
    parts = [rng.beta(2, 8, count // 3), rng.beta(8, 8, count // 3), rng.beta(8, 2, count - 2 * (count // 3))]
    return rng.permutation(np.concatenate(parts)).astype(np.float32)


@torch.no_grad()
def build_pair(size: str, arguments: BenchmarkArguments) -> DaWinCLIPModel:
    """Build a DaWin pair of the given size with random weights and a fitted mixture."""
    torch.manual_seed(arguments.seed)
    spec = SIZES[size]
    config = CLIPConfig(text_config=spec["text"], vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    zero_shot = CLIPModel(config).eval()
    fine_tuned = copy.deepcopy(zero_shot)
    for parameter in fine_tuned.parameters():
        parameter.add_(FINE_TUNED_NOISE * parameter.abs().mean() * torch.randn_like(parameter))

    zero_shot_head = torch.nn.functional.normalize(torch.randn(arguments.num_classes, spec["projection_dim"]), dim=-1)
    fine_tuned_head = torch.nn.functional.normalize(zero_shot_head + 0.5 * torch.randn_like(zero_shot_head), dim=-1)
    model = DaWinCLIPModel.from_pretrained_pair(
        zero_shot,
        fine_tuned,
        class_names=[f"class {index}" for index in range(arguments.num_classes)],
        zero_shot_head=LOGIT_SCALE * zero_shot_head,
        fine_tuned_head=LOGIT_SCALE * fine_tuned_head,
        processor=transformers.CLIPImageProcessor(),
        n_components=arguments.n_components,
    )
    model = model.to(device=arguments.device, dtype=getattr(torch, arguments.dtype))
    model.fit_mixture(synthetic_coefficients(10_000, arguments.seed))
    return model.eval()


def batch_inputs(model: DaWinCLIPModel, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(pixel_values, coefficients)` of shapes `(batch_size, 3, size, size)` and `(batch_size,)`."""
    generator = torch.Generator().manual_seed(seed)
    image_size = model.config.clip_config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    coefficients = torch.from_numpy(synthetic_coefficients(batch_size, seed + 1))
    return pixel_values.to(model.zero_shot_head.weight.device), coefficients


def vision_parameter_count(model: DaWinCLIPModel) -> int:
    classifier = model.endpoint_classifiers()[0]
    return sum(parameter.numel() for parameter in classifier.parameters())


# ----------------------------------------------------------------------------------------------------------
# The measured operations
# ----------------------------------------------------------------------------------------------------------


def _without_text_blocks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the text transformer's blocks, which the reference code's checkpoints do not contain."""
    return {key: value for key, value in state_dict.items() if not key.startswith(REFERENCE_UNMERGED_PREFIX)}


def reference_single_image(
    model: DaWinCLIPModel, pixel_values: torch.Tensor, coefficient: float, *, whole_model: bool = True
) -> torch.Tensor:
    """Classify one image the way the DaWin reference code does: copy the model, load merged weights, run it.

    Per sample, the reference code deep-copies the whole CLIP model, deletes its text transformer, and loads
    weights merged from its two checkpoints, which contain every CLIP weight except the text transformer's blocks,
    plus the head. With `whole_model=False` only the image classifier is copied and merged, a lower bound of
    that cost.

    Args:
        pixel_values (`torch.Tensor` of shape `(1, 3, height, width)`): One image.
        coefficient (`float`): Its weight on the fine-tuned endpoint.
    """
    if not whole_model:
        zero_shot, fine_tuned = model.endpoint_classifiers()
        merged = copy.deepcopy(zero_shot)
        merged.load_state_dict(merge_task_vectors(zero_shot.state_dict(), [fine_tuned.state_dict()], [coefficient]))
        return merged(pixel_values)
    merged = copy.deepcopy(model.zero_shot)
    merged_weights = merge_task_vectors(
        _without_text_blocks(model.zero_shot.state_dict()), [_without_text_blocks(model.fine_tuned.state_dict())],
        [coefficient],
    )  # fmt: skip
    merged.load_state_dict(merged_weights, strict=False)
    head = copy.deepcopy(model.zero_shot_head)
    head.load_state_dict(merge_task_vectors(model.zero_shot_head.state_dict(), [model.fine_tuned_head.state_dict()], [coefficient]))
    return CLIPImageClassifier(merged.vision_model, merged.visual_projection, head)(pixel_values)


class InPlaceReference:
    """Classify one image with weights merged in place into one working copy of the image classifier.

    Per image, `torch._foreach_copy_` writes the zero-shot weights into the working copy and
    `torch._foreach_lerp_` moves them toward the fine-tuned ones by the image's coefficient. Nothing is allocated
    per image. On a GPU its cost is expected to be the weight traffic plus a batch-one forward limited by kernel
    launches.
    """

    def __init__(self, model: DaWinCLIPModel):
        zero_shot, fine_tuned = model.endpoint_classifiers()
        self.working = copy.deepcopy(zero_shot).requires_grad_(False)
        self.weights = list(self.working.parameters())
        self.starts = [parameter.detach() for parameter in zero_shot.parameters()]
        self.ends = [parameter.detach() for parameter in fine_tuned.parameters()]

    def __call__(self, pixel_values: torch.Tensor, coefficient: float) -> torch.Tensor:
        torch._foreach_copy_(self.weights, self.starts)
        torch._foreach_lerp_(self.weights, self.ends, coefficient)
        return self.working(pixel_values)


def mode_operations(
    model: DaWinCLIPModel, pixel_values: torch.Tensor, coefficients: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """Return one callable per timed mode, all on the same batch."""
    forward_classifier = model.endpoint_classifiers()[0]
    alpha = float(model.config.alpha)

    def run_mode(mode: str, **kwargs) -> Callable[[], object]:
        return lambda: model(pixel_values=pixel_values, mode=mode, **kwargs)

    return {
        "forward": lambda: forward_classifier(pixel_values),
        "endpoints": lambda: model.endpoint_logits(pixel_values),
        # Synthetic coefficients replace the entropy-based ones after the endpoint pass (same cost), so that
        # every mixture component is used, as on a real shifted set.
        "sample": run_mode("sample", coefficients=coefficients),
        "mixture": run_mode("mixture", coefficients=coefficients),
        "static": run_mode("static", alpha=alpha),
        "zero_shot": run_mode("zero_shot"),
        "output_ensemble": run_mode("output_ensemble"),
    }


def build_components(model: DaWinCLIPModel) -> None:
    """Build the merged classifier of every mixture component (what `mixture` mode reuses)."""
    for mean in model.stored_mixture().component_means:
        model.merged_classifier(float(mean))


def _synchronize() -> None:
    """Wait for queued GPU work, so that wall time covers it; a no-op without CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(operation: Callable[[], object]) -> tuple[float, float]:
    """Run `operation` once; return `(wall seconds, process CPU seconds)`, GPU work included in wall time."""
    _synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    operation()
    _synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def summarize_times(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "seconds": statistics.median(sample[0] for sample in samples),
        "cpu_seconds": statistics.median(sample[1] for sample in samples),
        "repeats": len(samples),
    }


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def time_size(size: str, arguments: BenchmarkArguments) -> dict:
    """Time every mode, the reference procedure and the component build for one model size."""
    batch_size = arguments.batch_size_for.get(size, arguments.batch_size)
    started = time.perf_counter()
    model = build_pair(size, arguments)
    print(f"[{size}] pair built in {time.perf_counter() - started:.1f} s; batch {batch_size}", flush=True)
    with torch.inference_mode():
        return _time_modes(size, model, batch_size, arguments)


def _time_modes(size: str, model: DaWinCLIPModel, batch_size: int, arguments: BenchmarkArguments) -> dict:
    pixel_values, coefficients = batch_inputs(model, batch_size, arguments.seed)
    operations = mode_operations(model, pixel_values, coefficients)

    # One-time builds: the per-sample mixed classifier and the K merged components.
    model.clear_merged_cache()
    mixed_build = timed(model.mixed_classifier)
    component_build = []

    # Rounds: every mode once per round, in the same order, so that load changes hit all modes alike.
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in operations}
    for round_index in range(arguments.warmup + arguments.repeats):
        for name, operation in operations.items():
            measurement = timed(operation)
            if round_index >= arguments.warmup:
                samples[name].append(measurement)
        if round_index < arguments.warmup:
            print(f"[{size}] warm-up round {round_index + 1}/{arguments.warmup} done", flush=True)
            continue
        print(f"[{size}] round {round_index + 1 - arguments.warmup}/{arguments.repeats}: "
              + ", ".join(f"{name} {samples[name][-1][0]:.2f} s" for name in operations), flush=True)

    for _ in range(arguments.repeats):
        model.clear_merged_cache()
        gc.collect()
        component_build.append(timed(lambda: build_components(model)))

    # The reference procedure, one image at a time, after the endpoint pass it also needs.
    references: dict[str, list[tuple[float, float]]] = {name: [] for name in REFERENCE_MODES}
    in_place = InPlaceReference(model)
    for index in range(min(arguments.reference_images, batch_size)):
        image, coefficient = pixel_values[index : index + 1], float(coefficients[index])
        for name, whole_model in (("reference", True), ("reference_image_classifier", False)):
            references[name].append(
                timed(lambda: reference_single_image(model, image, coefficient, whole_model=whole_model))
            )
        references["reference_inplace"].append(timed(lambda: in_place(image, coefficient)))
    print(f"[{size}] reference per image {statistics.median(s[0] for s in references['reference']):.2f} s", flush=True)

    modes = {name: summarize_times(values) for name, values in samples.items()}
    forward = modes["forward"]
    for values in modes.values():
        values["images_per_second"] = batch_size / values["seconds"]
        values["ratio_to_forward"] = values["seconds"] / forward["seconds"]
        values["cpu_ratio_to_forward"] = values["cpu_seconds"] / forward["cpu_seconds"]

    reference_results = {}
    for name, samples_of_reference in references.items():
        per_image = summarize_times(samples_of_reference)
        entry = {
            "images_timed": len(samples_of_reference),
            "per_image_seconds": per_image["seconds"],
            "per_image_cpu_seconds": per_image["cpu_seconds"],
            "seconds": modes["endpoints"]["seconds"] + batch_size * per_image["seconds"],
            "cpu_seconds": modes["endpoints"]["cpu_seconds"] + batch_size * per_image["cpu_seconds"],
        }
        entry["images_per_second"] = batch_size / entry["seconds"]
        entry["ratio_to_forward"] = entry["seconds"] / forward["seconds"]
        entry["cpu_ratio_to_forward"] = entry["cpu_seconds"] / forward["cpu_seconds"]
        entry["sample_speedup"] = entry["seconds"] / modes["sample"]["seconds"]
        entry["sample_cpu_speedup"] = entry["cpu_seconds"] / modes["sample"]["cpu_seconds"]
        reference_results[name] = entry

    builds = {
        "components": {**summarize_times(component_build), "n_components": len(model.stored_mixture().component_means)},
        "mixed_classifier": {"seconds": mixed_build[0], "cpu_seconds": mixed_build[1], "repeats": 1},
    }
    for values in builds.values():
        values["ratio_to_forward"] = values["seconds"] / forward["seconds"]
        values["cpu_ratio_to_forward"] = values["cpu_seconds"] / forward["cpu_seconds"]

    spec = SIZES[size]
    return {
        "config": {**spec["vision"], "projection_dim": spec["projection_dim"], "num_classes": arguments.num_classes,
                   "text": spec["text"], "image_classifier_parameters": vision_parameter_count(model),
                   "clip_parameters": sum(parameter.numel() for parameter in model.zero_shot.parameters()),
                   "dtype": arguments.dtype},
        "batch_size": batch_size,
        "modes": modes,
        **{name: reference_results[name] for name in REFERENCE_MODES},
        "builds": builds,
        "used_components": int(np.unique(model.stored_mixture().predict(coefficients.numpy())).size),
    }


def time_mixture_fit(arguments: BenchmarkArguments) -> dict:
    """Time `BetaMixture.fit` on `mixture_fit_size` coefficients (median of `repeats`)."""
    values = synthetic_coefficients(arguments.mixture_fit_size, arguments.seed)
    samples = []
    for _ in range(arguments.repeats):
        samples.append(timed(lambda: BetaMixture(n_components=arguments.n_components).fit(values)))
    return {"num_values": int(values.size), "n_components": arguments.n_components, **summarize_times(samples)}


# ----------------------------------------------------------------------------------------------------------
# Peak memory (Linux): a fresh subprocess per size, the resident-set high-water mark reset before each step
# ----------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field.")
    return int(match.group(1))


def _release_and_reset_peak() -> int:
    """Return freed heap pages to the OS, reset VmHWM to the current RSS and return that RSS in KiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) of the process (Linux 4.0 and later).
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_kib("VmRSS")


def _on_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _peak_increase_mib(operation: Callable[[], object]) -> float:
    operation()  # warm-up: builds cached modules and allocator state that later calls reuse
    if _on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        operation()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    baseline = _release_and_reset_peak()
    operation()
    return (_proc_status_kib("VmHWM") - baseline) / 1024


def _persistent_increase_mib(operation: Callable[[], object]) -> float:
    if _on_gpu():
        before = torch.cuda.memory_allocated()
        operation()
        return (torch.cuda.memory_allocated() - before) / 2**20
    before = _release_and_reset_peak()
    operation()
    return (_release_and_reset_peak() - before) / 1024


def memory_worker(size: str, arguments: BenchmarkArguments) -> dict:
    """Measure peak memory of every mode for one size; runs inside its own process."""
    model = build_pair(size, arguments)
    with torch.inference_mode():
        return _measure_memory_of(size, model, arguments)


def _measure_memory_of(size: str, model: DaWinCLIPModel, arguments: BenchmarkArguments) -> dict:
    batch_size = arguments.batch_size_for.get(size, arguments.batch_size)
    model.clear_merged_cache()
    derived = {
        "mixed_classifier_mib": _persistent_increase_mib(model.mixed_classifier),
        "components_mib": _persistent_increase_mib(lambda: build_components(model)),
    }
    weights_mib = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values()) / 2**20

    pixel_values, coefficients = batch_inputs(model, batch_size, arguments.seed)
    operations = mode_operations(model, pixel_values, coefficients)
    for name, whole_model in (("reference", True), ("reference_image_classifier", False)):
        operations[name] = lambda whole_model=whole_model: reference_single_image(
            model, pixel_values[:1], float(coefficients[0]), whole_model=whole_model
        )
    in_place = InPlaceReference(model)
    operations["reference_inplace"] = lambda: in_place(pixel_values[:1], float(coefficients[0]))
    modes = {name: _peak_increase_mib(operation) for name, operation in operations.items()}

    sweep: dict[str, dict[str, float]] = {"forward": {}, "sample": {}}
    for sweep_batch in arguments.memory_batch_sizes:
        sweep_pixels, sweep_coefficients = batch_inputs(model, sweep_batch, arguments.seed)
        sweep_operations = mode_operations(model, sweep_pixels, sweep_coefficients)
        for name in sweep:
            sweep[name][str(sweep_batch)] = _peak_increase_mib(sweep_operations[name])
    return {"weights_mib": weights_mib, "derived": derived, "peak_increase_mib": modes, "batch_sweep": sweep}


def measure_memory(size: str, arguments: BenchmarkArguments) -> dict:
    """Run `memory_worker` for one size in a fresh Python process and return its result.

    On a GPU the worker runs in this process instead, because CUDA's allocator statistics can be reset.
    """
    if torch.device(arguments.device).type == "cuda":
        result = memory_worker(size, arguments)
        result["method"] = (
            "CUDA allocator statistics: after a warm-up call, the peak is reset; the value is "
            "torch.cuda.max_memory_allocated after one call minus torch.cuda.memory_allocated before it."
        )
        return result
    if not Path("/proc/self/clear_refs").exists():
        return {"skipped": "peak memory needs Linux /proc/self/clear_refs to reset the resident-set high-water mark"}
    job = json.dumps({"size": size, "arguments": {**dataclasses.asdict(arguments), "output": str(arguments.output),
                                                    "plot": str(arguments.plot)}})
    completed = subprocess.run([sys.executable, __file__, "--memory-worker", job], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"The memory measurement of size {size!r} failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["method"] = (
        "Linux resident set size in a fresh process per size: after a warm-up call and malloc_trim, VmHWM is "
        "reset through /proc/self/clear_refs; the value is VmHWM after one call minus VmRSS before it."
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def machine_description(threads: int, device: str = "cpu") -> dict:
    """Describe the CPU, core count, the GPU when one is used, and library versions."""
    cpu_model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s+(.+)$", lscpu, re.MULTILINE)
        cpu_model = match.group(1).strip() if match else cpu_model
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else None,
    }


def check_targets(results: dict) -> dict | None:
    """Compare the ViT-B/32 results at batch 32 on the CPU with the targets, on wall-clock and CPU-time ratios."""
    size = results["sizes"].get("vit-b-32")
    if size is None or size["batch_size"] != 32 or results.get("machine", {}).get("device", "cpu") != "cpu":
        return None
    checks = {}
    for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
        values = {
            "sample_ratio": size["modes"]["sample"][f"{prefix}ratio_to_forward"],
            "mixture_ratio": size["modes"]["mixture"][f"{prefix}ratio_to_forward"],
            "sample_speedup_over_reference": size["reference"][f"sample_{prefix}speedup"],
            "component_build_ratio": size["builds"]["components"][f"{prefix}ratio_to_forward"],
            "mixture_fit_seconds": results["mixture_fit"][f"{prefix}seconds"],
        }
        checks[clock] = {
            name: {"value": value, "met": value >= TARGETS[f"{name}_min"] if f"{name}_min" in TARGETS
                   else value <= TARGETS[f"{name}_max"]}
            for name, value in values.items()
        }
    return {"targets": TARGETS, **checks}


def ratio_clock(results: dict) -> str:
    """Return the clock whose ratios measure work: CPU time with one CPU thread, wall time otherwise.

    With several threads, CPU time adds up every thread's time, including threads that wait for work, so its
    ratios depend on scheduling more than on the work done. On a GPU, CPU time does not count the device's work.
    """
    machine = results.get("machine", {})
    if machine.get("device", "cpu") == "cpu" and machine.get("torch_threads") == 1:
        return "cpu"
    return "wall"


def plot_results(results: dict, path: Path) -> None:
    """Plot mode cost ratios per size and peak memory against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["sizes"])
    names = [name for name in TIMED_MODES if name != "forward"] + list(REFERENCE_MODES)
    clock = ratio_clock(results)
    ratio_key = "cpu_ratio_to_forward" if clock == "cpu" else "ratio_to_forward"
    figure, (ratios_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(sizes), 1)
    for offset, size in enumerate(sizes):
        entry = results["sizes"][size]
        values = [entry["modes"][name][ratio_key] for name in names if name in entry["modes"]]
        values += [entry[name][ratio_key] for name in REFERENCE_MODES if name in entry]
        positions = np.arange(len(names)) + (offset - (len(sizes) - 1) / 2) * width
        bars = ratios_axis.bar(positions, values, width, label=f"{size} (batch {entry['batch_size']})")
        ratios_axis.bar_label(bars, fmt="%.1f", fontsize=7)
    # The targets are set for the ViT-B/32-sized pair at batch 32 on a CPU, so other runs get no target lines.
    if results.get("targets"):
        targets = (
            (TARGETS["sample_ratio_max"], "ViT-B/32 sample target"),
            (TARGETS["mixture_ratio_max"], "ViT-B/32 mixture target"),
        )
        for target, label in targets:
            ratios_axis.axhline(target, linestyle="--", linewidth=0.8, color="gray")
            ratios_axis.text(len(names) - 0.5, target, label, fontsize=7, ha="right", va="bottom", color="gray")
    ratios_axis.set_yscale("log")
    ratios_axis.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ratios_axis.set_ylabel(f"{'CPU' if clock == 'cpu' else 'wall'} time / one endpoint forward (log scale)")
    ratios_axis.set_title("Cost per batch relative to one endpoint forward")
    ratios_axis.legend(fontsize=8)

    plotted = False
    for size in sizes:
        memory = results["sizes"][size].get("memory", {})
        sweep = memory.get("batch_sweep")
        if not sweep:
            continue
        for name, style in (("forward", "o--"), ("sample", "s-")):
            batches = sorted(int(batch) for batch in sweep[name])
            memory_axis.plot(batches, [sweep[name][str(batch)] for batch in batches], style, label=f"{size} {name}")
            plotted = True
    memory_axis.set_xlabel("batch size")
    memory_axis.set_ylabel("peak memory above the loaded model (MiB)")
    memory_axis.set_title("Peak memory: sample mode against one forward")
    if plotted:
        memory_axis.legend(fontsize=8)
    else:
        memory_axis.text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=memory_axis.transAxes)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_summary(results: dict) -> None:
    for size, entry in results["sizes"].items():
        print(f"\n{size}: batch {entry['batch_size']}, {entry['config']['image_classifier_parameters'] / 1e6:.1f}M "
              f"image-classifier parameters, {entry['config']['dtype']}")
        print(f"  {'mode':<26} {'images/s':>9} {'wall x fwd':>10} {'cpu x fwd':>10} {'peak MiB':>9}")
        peaks = entry.get("memory", {}).get("peak_increase_mib", {})
        rows = [(name, entry["modes"][name]) for name in TIMED_MODES]
        rows += [(name, entry[name]) for name in REFERENCE_MODES if name in entry]
        for name, values in rows:
            peak = peaks.get(name)
            print(f"  {name:<26} {values['images_per_second']:>9.2f} {values['ratio_to_forward']:>10.2f} "
                  f"{values['cpu_ratio_to_forward']:>10.2f} {'' if peak is None else f'{peak:.0f}':>9}")
        components = entry["builds"]["components"]
        print(f"  building {components['n_components']} components: {components['seconds']:.2f} s "
              f"({components['ratio_to_forward']:.2f} x forward)")
    fit = results["mixture_fit"]
    print(f"\nBeta mixture fit on {fit['num_values']} coefficients: {fit['seconds']:.3f} s")
    if ratio_clock(results) == "wall":
        print("The CPU-time ratios are not a measure of work with several threads or on a GPU: compare the wall-time "
              "ratios, or run with --threads 1 on a CPU.")
    if results.get("targets"):
        for clock in ("wall", "cpu"):
            met = {name: check["met"] for name, check in results["targets"][clock].items()}
            print(f"targets ({clock} clock): {met}")


def run_benchmark(arguments: BenchmarkArguments) -> dict:
    """Run every measurement, write the JSON and the plot, and return the results."""
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    results = {
        "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
        "machine": machine_description(torch.get_num_threads(), arguments.device),
        "load_average_start": list(os.getloadavg()),
        "arguments": {**dataclasses.asdict(arguments), "output": str(arguments.output), "plot": str(arguments.plot)},
        "sizes": {},
    }
    for size in arguments.sizes:
        results["sizes"][size] = time_size(size, arguments)
        if arguments.memory:
            results["sizes"][size]["memory"] = measure_memory(size, arguments)
        gc.collect()
    results["mixture_fit"] = time_mixture_fit(arguments)
    results["load_average_end"] = list(os.getloadavg())
    results["targets"] = check_targets(results)

    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=2) + "\n")
    plot_results(results, arguments.plot)
    print_summary(results)
    print(f"\nResults written to {arguments.output} and {arguments.plot}")
    return results


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.memory_worker is not None:
        job = json.loads(arguments.memory_worker)
        worker_arguments = BenchmarkArguments(**{**job["arguments"], "output": Path(job["arguments"]["output"]),
                                                 "plot": Path(job["arguments"]["plot"]), "memory_worker": None})
        if worker_arguments.threads is not None:
            torch.set_num_threads(worker_arguments.threads)
        print(json.dumps(memory_worker(job["size"], worker_arguments)))
        return 0
    run_benchmark(arguments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
