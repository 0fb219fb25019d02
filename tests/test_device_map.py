"""Placement with device_map: one map, per-endpoint maps, Accelerate hooks, and maps that do not fit."""

import psutil
import pytest
import torch
from accelerate import dispatch_model

from hf_dawin import DaWinCLIPModel
from hf_dawin.placement import cgroup_memory_left, free_memory, module_bytes, split_device_map

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, TINY_TEMPLATES, make_clip


@pytest.fixture()
def images():
    return torch.randn(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(9))


def _pair(tiny_pair_dirs, **kwargs):
    return DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, **kwargs
    )


@torch.inference_mode()
def _logits(model, images):
    return {mode: model(pixel_values=images, mode=mode).logits for mode in ("sample", "static", "output_ensemble")}


@pytest.mark.parametrize(
    "device_map",
    ["cpu", {"": "cpu"}, "auto", {"zero_shot": "cpu", "fine_tuned": {"": "cpu"}}, {"zero_shot": "auto", "fine_tuned": "cpu"}],
    ids=["string", "whole-model-dict", "auto", "per-endpoint", "per-endpoint-auto"],
)
def test_pair_device_maps_match_default(tiny_model, tiny_pair_dirs, images, device_map):
    placed = _pair(tiny_pair_dirs, device_map=device_map)
    assert {parameter.device.type for parameter in placed.parameters()} == {"cpu"}
    expected = _logits(tiny_model, images)
    for mode, logits in _logits(placed, images).items():
        torch.testing.assert_close(logits, expected[mode], msg=mode)


def test_split_device_map_cases():
    assert split_device_map("cpu") == {"zero_shot": "cpu", "fine_tuned": "cpu"}
    module_map = {"vision_model": 0, "text_model": "cpu"}
    assert split_device_map(module_map) == {"zero_shot": module_map, "fine_tuned": module_map}
    with pytest.raises(ValueError, match=r"exactly the keys 'zero_shot' and 'fine_tuned', received \['zero_shot'\]"):
        split_device_map({"zero_shot": "cpu"})
    with pytest.raises(ValueError, match="received"):
        split_device_map({"zero_shot": "cpu", "fine_tuned": "cpu", "head": "cpu"})


def test_misspelt_endpoint_key_rejected(tiny_pair_dirs):
    with pytest.raises(ValueError, match=r"has keys \['zeroshot'\], which are not modules of a CLIPModel"):
        _pair(tiny_pair_dirs, device_map={"zeroshot": "cpu"})
    with pytest.raises(ValueError, match=r"fine-tuned endpoint has keys \['vison_model'\]"):
        _pair(tiny_pair_dirs, device_map={"zero_shot": "cpu", "fine_tuned": {"vison_model": "cpu", "": "cpu"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device_map", ["cuda:0", 0, {"zero_shot": "cpu", "fine_tuned": {"vision_model": "cuda:1", "": "cpu"}}])
def test_missing_cuda_device_rejected(tiny_pair_dirs, tiny_model, tmp_path, device_map):
    with pytest.raises(ValueError, match="but CUDA is not available in this process. Use 'cpu', 'auto'"):
        _pair(tiny_pair_dirs, device_map=device_map)
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device_map of the DaWin model names 'cuda:0'"):
        DaWinCLIPModel.from_pretrained(tmp_path, device_map="cuda:0")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message where PyTorch has no MPS device")
@pytest.mark.parametrize(("device_map", "device_type"), [("mps", "mps"), ({"zero_shot": "cpu", "fine_tuned": "xla"}, "xla")])
def test_unbuilt_device_type_rejected(tiny_pair_dirs, device_map, device_type):
    with pytest.raises(ValueError, match=f"but this PyTorch build has no available '{device_type}' device"):
        _pair(tiny_pair_dirs, device_map=device_map)


def test_loaded_models_take_single_device_only(tiny_processor):
    zero_shot = make_clip(0)
    fine_tuned = make_clip(1, base=zero_shot, noise=0.3)
    kwargs = dict(class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor)
    model = DaWinCLIPModel.from_pretrained_pair(zero_shot, fine_tuned, device_map={"": "cpu"}, **kwargs)
    assert model.fine_tuned_head.weight.device.type == "cpu"
    with pytest.raises(ValueError, match="zero-shot endpoint, which was passed in as a loaded model"):
        DaWinCLIPModel.from_pretrained_pair(zero_shot, fine_tuned, device_map="auto", **kwargs)


def test_too_small_max_memory_names_sizes(tiny_pair_dirs):
    with pytest.raises(ValueError, match="does not fit") as error:
        _pair(tiny_pair_dirs, device_map="auto", max_memory={"cpu": "10KB"})
    message = str(error.value)
    assert "zero-shot endpoint" in message
    assert "max_memory: cpu: 9.8 KiB" in message  # 10KB is 10,000 bytes
    size = sum(tensor.numel() * tensor.element_size() for tensor in make_clip(0).state_dict().values())
    assert f"needs {size / 1024:.1f} KiB" in message
    assert "offloaded to disk" in message


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        (
            {"zero_shot": "cpu", "fine_tuned": "disk"},
            "device_map of the fine-tuned endpoint puts weights on 'disk', but DaWin reads every weight",
        ),
        (
            {"vision_model": "disk", "": "cpu"},
            "device_map of the zero-shot endpoint puts weights on 'disk', but DaWin reads every weight",
        ),
        (
            {"zero_shot": "cpu", "fine_tuned": "meta"},
            "device_map of the fine-tuned endpoint puts weights on 'meta', a device that stores shapes but no",
        ),
        ("meta", "device_map of the zero-shot endpoint puts weights on 'meta', a device that stores shapes but no"),
    ],
    ids=["endpoint-on-disk", "module-on-disk", "endpoint-on-meta", "pair-on-meta"],
)
def test_device_without_data_rejected(tiny_pair_dirs, device_map, message):
    with pytest.raises(ValueError, match=message):
        _pair(tiny_pair_dirs, device_map=device_map)


def test_offloaded_list_counts_the_rest(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "dawin")

    # Room for about a third of the model: "auto" then offloads many of its modules one by one.
    budget = module_bytes(tiny_model) // 3
    with pytest.raises(ValueError, match="does not fit") as error:
        DaWinCLIPModel.from_pretrained(tmp_path / "dawin", device_map="auto", max_memory={"cpu": budget})

    message = str(error.value)
    count = int(message.split(" module(s) offloaded to disk")[0].rsplit(" ", 1)[-1])
    assert count > 5
    assert f" and {count - 5} more)" in message


def test_endpoints_share_one_max_memory_budget(tiny_pair_dirs):
    size = sum(tensor.numel() * tensor.element_size() for tensor in make_clip(0).state_dict().values())

    # Room for one endpoint and a half: the zero-shot endpoint fits, the fine-tuned one does not.
    with pytest.raises(ValueError, match="fine-tuned endpoint \\(max_memory left after the zero-shot endpoint\\)"):
        _pair(tiny_pair_dirs, device_map="auto", max_memory={"cpu": int(1.5 * size)})

    model = _pair(tiny_pair_dirs, device_map="auto", max_memory={"cpu": 3 * size})
    assert model.fine_tuned.device.type == "cpu"


def test_saved_model_loads_with_device_map(tiny_model, tmp_path, images):
    tiny_model.save_pretrained(tmp_path / "dawin")
    expected = _logits(tiny_model, images)
    for device_map in ("auto", "cpu", {"zero_shot": "cpu", "fine_tuned": "cpu", "zero_shot_head": "cpu",
                                       "fine_tuned_head": "cpu"}):
        loaded = DaWinCLIPModel.from_pretrained(tmp_path / "dawin", device_map=device_map)
        for mode, logits in _logits(loaded, images).items():
            torch.testing.assert_close(logits, expected[mode], msg=f"{device_map}: {mode}")
    with pytest.raises(ValueError, match=r"DaWin model does not fit.*max_memory: cpu: 1000 B"):
        DaWinCLIPModel.from_pretrained(tmp_path / "dawin", device_map="auto", max_memory={"cpu": 1000})


def test_no_split_modules_declared():
    assert "CLIPEncoderLayer" in DaWinCLIPModel._no_split_modules
    assert "CLIPVisionEmbeddings" in DaWinCLIPModel._no_split_modules


# dispatch_model needs the root parameter logit_scale in the map, then warns that it names no submodule.
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")
def test_accelerate_hooks_do_not_bypass_mixing(tiny_model, images):
    """Hooked layers (as placed by a multi-device map) must run the mixed copy, not the original layers."""
    expected = _logits(tiny_model, images)
    coefficients = torch.linspace(0.1, 0.9, images.shape[0])
    with torch.inference_mode():
        expected_sample = tiny_model.interpolated_logits(images, coefficients)
    layer_map = {"vision_model.embeddings": "cpu", "vision_model.pre_layrnorm": "cpu", "vision_model.encoder": "cpu",
                 "vision_model.post_layernorm": "cpu", "visual_projection": "cpu", "text_model": "cpu",
                 "text_projection": "cpu", "logit_scale": "cpu"}
    for endpoint in (tiny_model.zero_shot, tiny_model.fine_tuned):
        dispatch_model(endpoint, device_map=layer_map, force_hooks=True)
    assert hasattr(tiny_model.zero_shot.vision_model.encoder, "_hf_hook")
    tiny_model.clear_merged_cache()
    with torch.inference_mode():
        hooked_sample = tiny_model.interpolated_logits(images, coefficients)
        zero_shot_logits = tiny_model.endpoint_logits(images)[0]
    torch.testing.assert_close(hooked_sample, expected_sample)
    assert not torch.allclose(hooked_sample, zero_shot_logits)
    for mode, logits in _logits(tiny_model, images).items():
        torch.testing.assert_close(logits, expected[mode], msg=mode)


# ----------------------------------------------------------------------------------------------------------
# Multi-task models load their endpoints through the same code
# ----------------------------------------------------------------------------------------------------------

MULTITASK_TASKS = {"animals": list(TINY_CLASS_NAMES), "colours": ["red", "green", "blue"]}


def test_multitask_endpoints_share_max_memory(tiny_pair_dirs, tiny_processor):
    from hf_dawin import DaWinMultiTaskCLIPModel

    size = sum(tensor.numel() * tensor.element_size() for tensor in make_clip(0).state_dict().values())
    endpoints = [tiny_pair_dirs[1], tiny_pair_dirs[0]]

    # Room for two endpoints and a half: the pre-trained and the first fine-tuned endpoint fit.
    with pytest.raises(ValueError, match=r"fine-tuned #2 \(b\) endpoint \(max_memory left after the pre-trained, "
                                         r"fine-tuned #1 \(a\) endpoints\) does not fit"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            tiny_pair_dirs[0], endpoints, tasks=MULTITASK_TASKS, fine_tuned_names=["a", "b"],
            device_map="auto", max_memory={"cpu": int(2.5 * size)},
        )  # fmt: skip

    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        tiny_pair_dirs[0], endpoints, tasks=MULTITASK_TASKS, device_map="auto", max_memory={"cpu": 4 * size},
    )  # fmt: skip
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}


def test_multitask_loaded_endpoints_cast_and_copied(tiny_processor, tmp_path):
    from hf_dawin import DaWinMultiTaskCLIPModel

    pretrained = make_clip(0)
    fine_tuned = make_clip(1, base=pretrained, noise=0.3)

    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, [fine_tuned, fine_tuned], tasks=MULTITASK_TASKS, processor=tiny_processor,
        dtype="bfloat16", fine_tuned_names=["a", "b"],
    )  # fmt: skip

    assert {parameter.dtype for parameter in model.fine_tuned.parameters()} == {torch.bfloat16}
    assert model.fine_tuned[0] is not model.fine_tuned[1]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="pre-trained endpoint, which was passed in as a loaded model"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            pretrained, [fine_tuned], tasks=MULTITASK_TASKS, processor=tiny_processor, device_map="auto"
        )


def test_saved_models_check_map_keys_and_fit(tiny_model, tiny_processor, tmp_path):
    from hf_dawin import DaWinMultiTaskCLIPModel

    tiny_model.save_pretrained(tmp_path / "dawin")
    pretrained = make_clip(0)
    multitask = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, [make_clip(1, base=pretrained, noise=0.3)], tasks=MULTITASK_TASKS, processor=tiny_processor,
    )  # fmt: skip
    multitask.save_pretrained(tmp_path / "multitask")

    with pytest.raises(ValueError, match=r"has keys \['zeroshot'\], which are not modules of a DaWinCLIPModel"):
        DaWinCLIPModel.from_pretrained(tmp_path / "dawin", device_map={"zeroshot": "cpu"})
    with pytest.raises(ValueError, match=r"has keys \['pretrain'\], which are not modules of a DaWinMultiTaskCLIPModel"):
        DaWinMultiTaskCLIPModel.from_pretrained(tmp_path / "multitask", device_map={"pretrain": "cpu"})
    with pytest.raises(ValueError, match=r"multi-task DaWin model does not fit.*max_memory: cpu: 1000 B"):
        DaWinMultiTaskCLIPModel.from_pretrained(tmp_path / "multitask", device_map="auto", max_memory={"cpu": 1000})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_max_memory_for_missing_gpu_rejected(tiny_pair_dirs, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="max_memory of the endpoints names 0, but CUDA is not available"):
        _pair(tiny_pair_dirs, device_map="auto", max_memory={0: "1GiB", "cpu": "1GiB"})
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_memory of the DaWin model names 'cuda:3', but CUDA is not available"):
        DaWinCLIPModel.from_pretrained(tmp_path, device_map="auto", max_memory={"cuda:3": "1GiB"})


def test_memory_sizes_of_modules_and_devices():
    layer = torch.nn.Linear(3, 4, dtype=torch.float64)
    layer.register_buffer("scale", torch.zeros(5, dtype=torch.float16))
    assert module_bytes(layer) == (3 * 4 + 4) * 8 + 5 * 2
    assert 0 < free_memory("cpu") <= psutil.virtual_memory().total
    assert free_memory("meta") is None


GIB = 2**30
NO_LIMIT_V1 = "9223372036854771712"


@pytest.mark.parametrize(
    ("membership", "files", "expected"),
    [
        # Version 2 inside a namespace: the group is the mount point, and inactive file cache counts as free.
        ("0::/\n", {"memory.max": "1000", "memory.current": "300", "memory.stat": "anon 100\ninactive_file 200\n"}, 900),
        ("0::/\n", {"memory.max": "max\n", "memory.current": "300\n"}, None),
        ("0::/\n", {"memory.max": "200\n", "memory.current": "300\n"}, 0),
        # A limit set on a group above the process's own group applies too.
        (
            "0::/service.slice/job.scope\n",
            {
                "service.slice/memory.max": str(8 * GIB), "service.slice/memory.current": str(6 * GIB),
                "service.slice/job.scope/memory.max": "max", "service.slice/job.scope/memory.current": str(GIB),
            },
            2 * GIB,
        ),
        # Version 1: the group is read under the memory mount, not at its top.
        (
            "4:memory:/jobs/7\n0::/\n",
            {
                "memory/memory.limit_in_bytes": NO_LIMIT_V1, "memory/memory.usage_in_bytes": str(9 * GIB),
                "memory/jobs/7/memory.limit_in_bytes": "5000", "memory/jobs/7/memory.usage_in_bytes": "1000",
                "memory/jobs/7/memory.stat": "cache 900\ntotal_inactive_file 500\n",
            },
            4500,
        ),
        ("4:memory:/jobs/7\n", {"memory/memory.limit_in_bytes": NO_LIMIT_V1, "memory/memory.usage_in_bytes": "1"}, None),
        ("0::/\n", {}, None),
        (None, {"memory.max": "1000", "memory.current": "400"}, 600),
    ],
)
def test_cgroup_memory_limits(tmp_path, membership, files, expected):
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    membership_file = tmp_path / "membership"
    if membership is not None:
        membership_file.write_text(membership)
    assert cgroup_memory_left(root, membership_file) == expected


def test_meta_in_saved_model_device_map_rejected(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "dawin")

    with pytest.raises(ValueError, match="puts weights on 'meta'"):
        DaWinCLIPModel.from_pretrained(tmp_path / "dawin", device_map={"zero_shot": "cpu", "fine_tuned": "meta"})
