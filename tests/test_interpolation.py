"""Static merges and per-sample mixing layers against explicit merges."""

import pytest
import torch
from torch import nn

from hf_dawin.interpolation import (
    MixingState,
    build_mixed_module,
    check_compatible_state_dicts,
    interpolate_state_dicts,
    merge_task_vectors,
)

from .conftest import make_clip


def test_interpolate_state_dicts_by_hand():
    zero_shot = {"w": torch.tensor([0.0, 2.0]), "steps": torch.tensor([3])}
    fine_tuned = {"w": torch.tensor([4.0, 6.0]), "steps": torch.tensor([3])}
    merged = interpolate_state_dicts(zero_shot, fine_tuned, 0.25)
    torch.testing.assert_close(merged["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(merged["steps"], torch.tensor([3]))


def test_merge_keeps_dtype_and_computes_in_float32():
    zero_shot = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    fine_tuned = {"w": torch.tensor([3.0, 2.5], dtype=torch.bfloat16)}
    merged = merge_task_vectors(zero_shot, [fine_tuned], [0.5])
    assert merged["w"].dtype == torch.bfloat16
    torch.testing.assert_close(merged["w"].float(), torch.tensor([2.0, 2.25]))


def test_merge_rejects_non_finite_result():
    with pytest.raises(ValueError, match="parameter 'w'"):
        interpolate_state_dicts({"w": torch.tensor([0.0])}, {"w": torch.tensor([float("inf")])}, 0.5)


def test_merge_task_vectors_several_endpoints():
    base = {"w": torch.tensor([1.0])}
    endpoints = [{"w": torch.tensor([3.0])}, {"w": torch.tensor([0.0])}]
    merged = merge_task_vectors(base, endpoints, [0.5, 2.0])
    torch.testing.assert_close(merged["w"], torch.tensor([1.0 + 0.5 * 2.0 + 2.0 * -1.0]))
    with pytest.raises(ValueError, match="one coefficient per fine-tuned endpoint"):
        merge_task_vectors(base, endpoints, [0.5])


def test_long_key_lists_truncated():
    reference = {f"layer.{index:02d}.weight": torch.zeros(1) for index in range(25)}

    with pytest.raises(ValueError) as error:
        check_compatible_state_dicts(reference, {}, reference_name="pre-trained", other_name="fine-tuned #1 (a)")

    missing_line = next(line for line in str(error.value).splitlines() if line.startswith("Missing"))
    assert missing_line.startswith("Missing from the fine-tuned #1 (a) endpoint (25): layer.00.weight, ")
    assert "layer.19.weight, ... and 5 more" in missing_line
    assert "layer.20.weight" not in missing_line
    assert "as the pre-trained endpoint" in str(error.value)


def test_incompatible_dtypes_reported():
    with pytest.raises(ValueError, match=r"different dtypes \(zero-shot vs fine-tuned: torch.float32 vs torch.float64, in 1 of 1 tensors\)"):
        check_compatible_state_dicts({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})
    # Beside a shape mismatch, a dtype difference is listed in the architecture report.
    with pytest.raises(ValueError, match=r"share an architecture(.|\n)*Dtype mismatches .*: w: torch.float32 vs torch.float64"):
        check_compatible_state_dicts(
            {"w": torch.zeros(2), "v": torch.zeros(3)}, {"w": torch.zeros(2, dtype=torch.float64), "v": torch.zeros(4)}
        )


@torch.no_grad()
def test_mixed_vision_tower_matches_per_sample_merges():
    zero_shot = make_clip(0)
    fine_tuned = make_clip(1, base=zero_shot, noise=0.3)
    mixed, state = build_mixed_module(zero_shot.vision_model, [fine_tuned.vision_model])
    pixel_values = torch.randn(4, 3, 16, 16)
    coefficients = torch.tensor([0.0, 0.3, 0.6, 1.0])
    state.set_coefficients(coefficients.unsqueeze(1))
    pooled = mixed(pixel_values=pixel_values).pooler_output
    for index, alpha in enumerate(coefficients.tolist()):
        merged = make_clip(0).vision_model
        merged.load_state_dict(
            interpolate_state_dicts(zero_shot.vision_model.state_dict(), fine_tuned.vision_model.state_dict(), alpha)
        )
        expected = merged(pixel_values=pixel_values[index : index + 1]).pooler_output
        assert (pooled[index] - expected[0]).abs().max().item() < 1e-4


@torch.no_grad()
def test_mixed_conv_bias_matches_merges():
    # CLIP's patch embedding has no bias, but the convolutions of other vision towers do.
    torch.manual_seed(1)
    layers = [nn.Conv2d(3, 4, kernel_size=3, stride=2, bias=True) for _ in range(2)]
    mixed, state = build_mixed_module(layers[0], layers[1:])
    inputs = torch.randn(3, 3, 9, 9)
    coefficients = torch.tensor([0.0, 0.4, 1.0])
    state.set_coefficients(coefficients.unsqueeze(1))
    outputs = mixed(inputs)
    for index, alpha in enumerate(coefficients.tolist()):
        merged = nn.Conv2d(3, 4, kernel_size=3, stride=2, bias=True)
        merged.load_state_dict(interpolate_state_dicts(layers[0].state_dict(), layers[1].state_dict(), alpha))
        torch.testing.assert_close(outputs[index], merged(inputs[index : index + 1])[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_mixed_module_several_task_vectors():
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.LayerNorm(7), nn.Linear(7, 3)) for _ in range(3)]
    mixed, state = build_mixed_module(layers[0], layers[1:])
    inputs = torch.randn(2, 4, 5)
    coefficients = torch.tensor([[0.2, 0.5], [1.0, -0.3]])
    state.set_coefficients(coefficients)
    outputs = mixed(inputs)
    states = [layer.state_dict() for layer in layers]
    for index in range(2):
        merged = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.LayerNorm(7), nn.Linear(7, 3))
        merged.load_state_dict(merge_task_vectors(states[0], states[1:], coefficients[index].tolist()))
        torch.testing.assert_close(outputs[index], merged(inputs[index]), atol=1e-5, rtol=1e-5)


def test_mixed_module_shares_no_parameters_with_base():
    zero_shot = make_clip(0)
    fine_tuned = make_clip(1, base=zero_shot)
    mixed, _ = build_mixed_module(zero_shot.vision_model, [fine_tuned.vision_model])
    assert list(mixed.parameters()) == []
    assert len(list(zero_shot.vision_model.parameters())) > 0


def test_unsupported_layer_reported():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    with pytest.raises(NotImplementedError, match="scale"):
        build_mixed_module(Scaled(), [Scaled()])


def test_mixing_state_checks_shapes():
    state = MixingState(num_task_vectors=1)
    with pytest.raises(ValueError, match=r"\(batch_size, 1\)"):
        state.set_coefficients(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="set_coefficients"):
        state.require_weights(3, torch.float32)
