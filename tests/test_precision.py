"""Reduced-precision endpoints: float32 coefficients, agreement with float32, and unsupported dtypes."""

import copy
import json
import logging

import pytest
import torch

from hf_dawin import DaWinCLIPModel
from hf_dawin import placement
from hf_dawin.interpolation import build_merged_module, merge_task_vectors
from hf_dawin.placement import check_dtype_supported, resolve_dtype

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, TINY_TEMPLATES, make_clip


# bfloat16 keeps 8 significant bits, so every logit carries a relative error of a few 2^-8. The coefficient is
# sigmoid(H_0 - H_1), whose slope is at most 1/4, so 0.02 allows an error of 0.08 nats in H_0 - H_1. The value
# is measured, not derived: on all 51,797 test images of the embedded benchmark the largest difference was
# 0.0151 (mean 0.002). tests/benchmarks/test_reference_pair.py checks it on real images.
COEFFICIENT_TOLERANCE = 0.02
RELATIVE_LOGIT_TOLERANCE = 0.05


@pytest.fixture()
def images():
    return torch.randn(16, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture()
def bf16_model(tiny_pair_dirs):
    return DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
        dtype=torch.bfloat16,
    )


@pytest.fixture()
def fresh_checks(monkeypatch):
    """Forget which (dtype, device) pairs passed, so that each test runs the check again."""
    monkeypatch.setattr(placement, "_VERIFIED", set())


def _assert_logits_close(actual, expected):
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= RELATIVE_LOGIT_TOLERANCE * scale


def test_bf16_endpoints_keep_float32_outputs(bf16_model, images):
    for parameter in [*bf16_model.zero_shot.parameters(), *bf16_model.fine_tuned_head.parameters()]:
        assert parameter.dtype == torch.bfloat16
    with torch.inference_mode():
        outputs = bf16_model(pixel_values=images, mode="sample")
    assert outputs.logits.dtype == torch.float32
    assert outputs.coefficients.dtype == torch.float32
    assert outputs.zero_shot_entropy.dtype == torch.float32
    assert outputs.fine_tuned_entropy.dtype == torch.float32
    assert outputs.zero_shot_logits.dtype == torch.float32


def test_bf16_coefficients_match_float32(tiny_model, bf16_model, images):
    with torch.inference_mode():
        full = tiny_model(pixel_values=images, mode="sample")
        reduced = bf16_model(pixel_values=images, mode="sample")
    difference = (full.coefficients - reduced.coefficients).abs().max().item()
    assert difference <= COEFFICIENT_TOLERANCE
    _assert_logits_close(reduced.logits, full.logits)
    _assert_logits_close(reduced.zero_shot_logits, full.zero_shot_logits)


def test_bf16_sample_mode_matches_bf16_merges(bf16_model, images):
    coefficients = torch.linspace(0.0, 1.0, images.shape[0])
    with torch.inference_mode():
        mixed = bf16_model.interpolated_logits(images, coefficients)
        for index, alpha in enumerate(coefficients.tolist()):
            merged = bf16_model.static_logits(images[index : index + 1], alpha)
            _assert_logits_close(mixed[index : index + 1], merged)


def test_model_to_bf16_runs_every_mode(tiny_model, images):
    model = tiny_model.to(torch.bfloat16)
    assert model.zero_shot.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        coefficients = model(pixel_values=images, mode="sample").coefficients
        model.fit_mixture(coefficients)
        for mode in ("sample", "mixture", "static", "zero_shot", "fine_tuned", "output_ensemble"):
            outputs = model(pixel_values=images, mode=mode)
            assert outputs.logits.dtype == torch.float32, mode
            assert bool(torch.isfinite(outputs.logits).all()), mode


def test_dtype_name_casts_loaded_models(tiny_processor):
    zero_shot = make_clip(0)
    fine_tuned = make_clip(1, base=zero_shot, noise=0.3)
    model = DaWinCLIPModel.from_pretrained_pair(
        zero_shot, fine_tuned, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor,
        dtype="bfloat16",
    )
    assert model.fine_tuned.text_projection.weight.dtype == torch.bfloat16
    assert model.zero_shot_head.weight.dtype == torch.bfloat16


def test_resolve_dtype_rejects_integers():
    assert resolve_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="received torch.int64"):
        resolve_dtype(torch.int64)


def test_unsupported_cpu_dtype_raises_clearly(tiny_pair_dirs, fresh_checks, monkeypatch):
    def failing_probe(dtype, device):
        raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')

    monkeypatch.setattr(placement, "_probe", failing_probe)
    with pytest.raises(ValueError, match=r"dtype float16 is not supported on cpu") as error:
        DaWinCLIPModel.from_pretrained_pair(
            tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
            dtype=torch.float16,
        )
    assert "zero-shot endpoint" in str(error.value)
    assert "dtype=torch.bfloat16" in str(error.value)


def test_forward_checks_dtype_after_to(tiny_model, images, fresh_checks, monkeypatch):
    model = tiny_model.to(torch.float16)

    def failing_probe(dtype, device):
        raise RuntimeError("not implemented for 'Half'")

    monkeypatch.setattr(placement, "_probe", failing_probe)
    with pytest.raises(ValueError, match="dtype float16 is not supported on cpu"):
        model(pixel_values=images, mode="zero_shot")


def test_cuda_without_bf16_rejected(fresh_checks, monkeypatch):
    probed = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(placement, "_probe", lambda dtype, device: probed.append((dtype, device)))
    with pytest.raises(ValueError, match=r"bfloat16 was requested on cuda:1.*compute capability 8\.0"):
        check_dtype_supported(torch.bfloat16, "cuda:1")
    assert probed == []
    # float16 on the same GPU goes on to the operator probe.
    assert check_dtype_supported(torch.float16, "cuda:1") == torch.float16
    assert probed == [(torch.float16, torch.device("cuda", 1))]


def test_supported_pair_probed_once(fresh_checks, monkeypatch):
    calls = []
    monkeypatch.setattr(placement, "_probe", lambda dtype, device: calls.append(dtype))
    for _ in range(3):
        check_dtype_supported(torch.bfloat16, "cpu")
    check_dtype_supported(torch.float32, "cpu")
    assert calls == [torch.bfloat16]


def test_real_probe_passes_bf16_on_cpu(fresh_checks):
    assert check_dtype_supported("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_module_equals_state_dict_merge(dtype):
    zero_shot = make_clip(0).to(dtype)
    fine_tuned = make_clip(1, base=make_clip(0), noise=0.3).to(dtype)
    merged = build_merged_module(zero_shot, [fine_tuned], [0.3])
    expected = merge_task_vectors(zero_shot.state_dict(), [fine_tuned.state_dict()], [0.3])
    state = merged.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(merged.parameters(), zero_shot.parameters()))


def test_merged_module_rejects_non_finite():
    zero_shot = torch.nn.Linear(2, 2)
    fine_tuned = copy.deepcopy(zero_shot)
    with torch.no_grad():
        fine_tuned.bias.fill_(float("inf"))
    with pytest.raises(ValueError, match="parameter 'bias'"):
        build_merged_module(zero_shot, [fine_tuned], [0.5])


def test_mixed_dtype_endpoints_load_float32(tiny_pair_dirs, tiny_endpoints, tmp_path, caplog):
    # transformers loads a checkpoint in the dtype it was saved in, so a float16 fine-tune beside a float32
    # zero-shot checkpoint would otherwise fail the architecture check.
    half_dir = tmp_path / "fine_tuned_float16"
    copy.deepcopy(tiny_endpoints[1]).half().save_pretrained(half_dir)
    with caplog.at_level(logging.WARNING, logger="hf_dawin.modeling_dawin"):
        model = DaWinCLIPModel.from_pretrained_pair(
            tiny_pair_dirs[0], half_dir, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
        )
    assert "zero-shot float32, fine-tuned float16" in caplog.text
    assert "every endpoint loaded from a path is loaded in float32" in caplog.text
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    # The float16 weights are cast exactly: the loaded endpoint equals the rounded original.
    expected = copy.deepcopy(tiny_endpoints[1]).half().float().state_dict()
    for key, value in model.fine_tuned.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_mixed_dtype_models_name_fix(tiny_endpoints, tiny_processor):
    zero_shot, fine_tuned = tiny_endpoints
    with pytest.raises(ValueError) as raised:
        DaWinCLIPModel.from_pretrained_pair(
            zero_shot, copy.deepcopy(fine_tuned).half(), class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
            processor=tiny_processor,
        )
    message = str(raised.value)
    assert "different dtypes (zero-shot vs fine-tuned: torch.float32 vs torch.float16" in message
    assert "dtype=torch.float32" in message
    assert "share an architecture" not in message
    assert zero_shot.text_projection.weight.dtype == torch.float32  # the caller's models are not cast


def test_stored_dtype_from_safetensors_header(tiny_pair_dirs, tiny_endpoints, tmp_path):
    # Without a dtype in config.json, transformers loads the weights' own dtype, which the safetensors header gives.
    half_dir = tmp_path / "fine_tuned_float16"
    copy.deepcopy(tiny_endpoints[1]).half().save_pretrained(half_dir, max_shard_size="50KB")
    config = json.loads((half_dir / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (half_dir / "config.json").write_text(json.dumps(config))
    assert (half_dir / "model.safetensors.index.json").is_file()

    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], half_dir, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
    )
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_torch_dtype_is_honoured(tiny_pair_dirs, tiny_endpoints, tmp_path):
    half_dir = tmp_path / "fine_tuned_float16"
    copy.deepcopy(tiny_endpoints[1]).half().save_pretrained(half_dir)
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], half_dir, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, torch_dtype=torch.bfloat16
    )
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
