"""Tests for the contrastive training shared by the reference pair and the multi-task suite."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from hf_dawin.benchmarks import training as training_module
from hf_dawin.benchmarks.training import (
    MAX_LOGIT_SCALE,
    ContrastiveBatch,
    build_optimizer,
    contrastive_loss,
    contrastive_step,
    final_loss,
    learning_rate_factor,
    read_manifest,
    train_contrastive_stage,
    train_or_reuse,
)

from ..conftest import TINY_IMAGE_SIZE, TINY_VOCAB_SIZE, tiny_clip_config


NUM_CLASSES = 4
NUM_TEMPLATES = 2
BATCH_SIZE = 16


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny models here run far slower on two threads than on one when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config())


def caption_table() -> torch.Tensor:
    """Token ids `(NUM_CLASSES * NUM_TEMPLATES, 6)`: bos, a class token, a template token, eos, then eos padding."""
    bos, eos = TINY_VOCAB_SIZE - 2, TINY_VOCAB_SIZE - 1
    input_ids = torch.full((NUM_CLASSES * NUM_TEMPLATES, 6), eos)
    for label in range(NUM_CLASSES):
        for template in range(NUM_TEMPLATES):
            input_ids[label * NUM_TEMPLATES + template, :4] = torch.tensor([bos, 100 + label, 200 + template, eos])
    return input_ids


def prototype_sampler(seed: int = 0):
    """A sampler of noisy copies of one random image per class, each paired with a random template of its class."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(NUM_CLASSES, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    calls = []

    def sample_batch() -> ContrastiveBatch:
        calls.append(len(calls))
        labels = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=generator)
        noise = torch.randn(BATCH_SIZE, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
        templates = torch.randint(0, NUM_TEMPLATES, (BATCH_SIZE,), generator=generator)
        return ContrastiveBatch(prototypes[labels] + 0.3 * noise, labels * NUM_TEMPLATES + templates, labels)

    sample_batch.calls = calls
    return sample_batch


# ----------------------------------------------------------------------------------------------------------
# Schedule and optimizer
# ----------------------------------------------------------------------------------------------------------


def test_schedule_warmup_then_cosine():
    # 10 steps, warm-up fraction 0.2: two warm-up steps, then a cosine over the remaining 8 steps.
    factors = [learning_rate_factor(step, 10, 0.2) for step in range(10)]
    assert factors[0] == pytest.approx(0.5)
    assert factors[1] == pytest.approx(1.0)
    # The cosine starts at 1 right after warm-up: progress 0/8.
    assert factors[2] == pytest.approx(1.0)
    # Progress 4/8 is the cosine's midpoint.
    assert factors[6] == pytest.approx(0.5)
    # Progress 7/8: 0.5 * (1 + cos(7 pi / 8)) = 0.5 * (1 - 0.9238795) = 0.0380602.
    assert factors[9] == pytest.approx(0.0380602, abs=1e-7)
    assert all(later < earlier for earlier, later in zip(factors[2:], factors[3:]))


def test_schedule_without_warmup_fraction():
    # A warm-up fraction of 0 still warms up for one step, which reaches the full rate at once.
    assert learning_rate_factor(0, 5, 0.0) == pytest.approx(1.0)
    assert learning_rate_factor(1, 5, 0.0) == pytest.approx(1.0)
    # Progress 2/4 after the single warm-up step.
    assert learning_rate_factor(3, 5, 0.0) == pytest.approx(0.5)


def test_optimizer_groups_by_tower_and_decay():
    model = tiny_clip()
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.05, text_learning_rate_factor=0.2)
    group_of = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert id(parameter) not in group_of, "a parameter is in two groups"
            group_of[id(parameter)] = group
    parameters = dict(model.named_parameters())
    assert len(group_of) == len(parameters)
    assert len(optimizer.param_groups) == 4

    # (weight decay, peak learning rate) expected for representative parameters.
    expected = {
        "text_model.embeddings.token_embedding.weight": (0.0, 2e-4),
        "text_model.embeddings.position_embedding.weight": (0.0, 2e-4),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (0.05, 2e-4),
        "text_model.encoder.layers.0.self_attn.q_proj.bias": (0.0, 2e-4),
        "text_model.final_layer_norm.weight": (0.0, 2e-4),
        "text_projection.weight": (0.05, 2e-4),
        "vision_model.embeddings.patch_embedding.weight": (0.0, 1e-3),
        "vision_model.embeddings.class_embedding": (0.0, 1e-3),
        "vision_model.pre_layrnorm.weight": (0.0, 1e-3),
        "vision_model.encoder.layers.1.mlp.fc2.weight": (0.05, 1e-3),
        "vision_model.encoder.layers.1.mlp.fc2.bias": (0.0, 1e-3),
        "visual_projection.weight": (0.05, 1e-3),
        "logit_scale": (0.0, 1e-3),
    }
    for name, (weight_decay, peak_lr) in expected.items():
        group = group_of[id(parameters[name])]
        assert group["weight_decay"] == weight_decay, name
        assert group["peak_lr"] == pytest.approx(peak_lr), name


def test_optimizer_adamw_settings():
    optimizer = build_optimizer(tiny_clip(), 1e-3, weight_decay=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.98)
    assert optimizer.defaults["eps"] == 1e-6
    # Without a text factor, every group peaks at the same rate.
    assert {group["peak_lr"] for group in optimizer.param_groups} == {1e-3}


@pytest.mark.parametrize(
    ("learning_rate", "kwargs", "message"),
    [
        (0.0, {"weight_decay": 0.0}, "`learning_rate` must be positive, received 0.0"),
        (1e-3, {"weight_decay": -0.1}, "`weight_decay` must be non-negative, received -0.1"),
        (1e-3, {"weight_decay": 0.0, "text_learning_rate_factor": 0.0}, "`text_learning_rate_factor` must be"),
    ],
)
def test_optimizer_rejects_invalid_values(learning_rate, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(tiny_clip(), learning_rate, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Loss and step
# ----------------------------------------------------------------------------------------------------------


def test_contrastive_loss_matches_clip_definition():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=generator)
    targets = torch.arange(6)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(contrastive_loss(logits), expected)
    # Distinct labels leave only the diagonal as positives: the same loss.
    torch.testing.assert_close(contrastive_loss(logits, torch.arange(6)), expected)


def test_contrastive_loss_with_shared_labels():
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.5, 0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # Rows 0 and 1 have two positives each (columns 0 and 1), row 2 one positive.
    log_rows = torch.log_softmax(logits, dim=1)
    log_columns = torch.log_softmax(logits.T, dim=1)
    image_to_text = -(
        (log_rows[0, 0] + log_rows[0, 1]) / 2 + (log_rows[1, 0] + log_rows[1, 1]) / 2 + log_rows[2, 2]
    ) / 3
    text_to_image = -(
        (log_columns[0, 0] + log_columns[0, 1]) / 2 + (log_columns[1, 0] + log_columns[1, 1]) / 2 + log_columns[2, 2]
    ) / 3
    torch.testing.assert_close(contrastive_loss(logits, labels), (image_to_text + text_to_image) / 2)


@pytest.mark.parametrize("with_class_ids", [True, False])
def test_contrastive_step_matches_direct_computation(with_class_ids):
    model = tiny_clip().eval()
    input_ids = caption_table()
    pixel_values = torch.randn(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    # Captions 2 and 7 repeat, so the step embeds fewer captions than images.
    caption_indices = torch.tensor([2, 7, 2, 0, 7])
    class_ids = caption_indices // NUM_TEMPLATES if with_class_ids else None

    loss = contrastive_step(model, pixel_values, caption_indices, input_ids, class_ids)

    # Embed every image's caption directly, repeats included.
    with torch.no_grad():
        text = F.normalize(model.get_text_features(input_ids=input_ids[caption_indices]).pooler_output, dim=-1)
        image = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        expected = contrastive_loss(model.logit_scale.exp() * image @ text.T, class_ids)
    torch.testing.assert_close(loss.detach(), expected)
    assert loss.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Stage loop
# ----------------------------------------------------------------------------------------------------------


def test_stage_lowers_loss_on_tiny_clip():
    model = tiny_clip()
    sampler = prototype_sampler()
    losses = train_contrastive_stage(
        model, sampler, caption_table(), steps=30, learning_rate=3e-3, weight_decay=0.0, warmup_fraction=0.1,
        progress=False,
    )  # fmt: skip
    assert len(losses) == 30
    assert len(sampler.calls) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses
    assert not model.training


def test_stage_uses_scheduled_learning_rates(monkeypatch):
    optimizers = []

    def recording_build_optimizer(*args, **kwargs):
        optimizers.append(build_optimizer(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(training_module, "build_optimizer", recording_build_optimizer)
    sample_batch = prototype_sampler()
    rates = []

    def recording_sampler() -> ContrastiveBatch:
        # The loop sets the step's rates before it draws the batch.
        rates.append({group["peak_lr"]: group["lr"] for group in optimizers[-1].param_groups})
        return sample_batch()

    train_contrastive_stage(
        tiny_clip(), recording_sampler, caption_table(), steps=4, learning_rate=0.01, weight_decay=0.0,
        warmup_fraction=0.5, text_learning_rate_factor=0.5, progress=False,
    )  # fmt: skip
    # Two warm-up steps (factors 1/2 and 1), then a cosine over two steps (factors 1 and 1/2).
    for step, factor in enumerate([0.5, 1.0, 1.0, 0.5]):
        assert rates[step][0.01] == pytest.approx(0.01 * factor), step
        assert rates[step][0.005] == pytest.approx(0.005 * factor), step


@pytest.mark.parametrize("label_positives", [True, False])
def test_stage_label_positives_choose_loss(label_positives):
    model = tiny_clip()
    expected_model = copy.deepcopy(model).train()
    input_ids = caption_table()
    batch = prototype_sampler(seed=3)()
    # Repeated classes make the two losses differ.
    assert len(batch.class_ids.unique()) < len(batch.class_ids)
    class_ids = batch.class_ids if label_positives else None
    with torch.no_grad():
        expected = contrastive_step(expected_model, batch.pixel_values, batch.caption_indices, input_ids, class_ids)

    losses = train_contrastive_stage(
        model, lambda: batch, input_ids, steps=1, learning_rate=1e-3, weight_decay=0.0, warmup_fraction=0.0,
        label_positives=label_positives, progress=False,
    )  # fmt: skip
    assert losses[0] == pytest.approx(expected.item(), rel=1e-6)


def test_stage_clamps_logit_scale():
    model = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    train_contrastive_stage(
        model, prototype_sampler(), caption_table(), steps=1, learning_rate=1e-3, weight_decay=0.0,
        warmup_fraction=0.0, progress=False,
    )  # fmt: skip
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)


def test_stage_without_steps_changes_nothing():
    model = tiny_clip()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    sampler = prototype_sampler()
    losses = train_contrastive_stage(
        model, sampler, caption_table(), steps=0, learning_rate=1e-3, weight_decay=0.0, warmup_fraction=0.1,
        progress=False,
    )  # fmt: skip
    assert losses == []
    assert sampler.calls == []
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1}, "`steps` must be a non-negative integer, received -1"),
        ({"steps": 2.0}, "`steps` must be a non-negative integer, received 2.0"),
        ({"warmup_fraction": 1.5}, r"`warmup_fraction` must be in \[0, 1\], received 1.5"),
        ({"learning_rate": -1e-3}, "`learning_rate` must be positive"),
    ],
)
def test_stage_rejects_invalid_values(kwargs, message):
    arguments = {"steps": 1, "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_contrastive_stage(tiny_clip(), prototype_sampler(), caption_table(), progress=False, **arguments)


def test_final_loss_averages_last_steps():
    assert final_loss([]) is None
    # The last 20 of 0..24 are 5..24, whose mean is 14.5.
    assert final_loss([float(value) for value in range(25)]) == 14.5
    assert final_loss([2.0, 4.0]) == 3.0


# ----------------------------------------------------------------------------------------------------------
# Manifests and cached folders
# ----------------------------------------------------------------------------------------------------------


def test_read_manifest_cases(tmp_path):
    assert read_manifest(tmp_path, "run.json") is None
    (tmp_path / "run.json").write_text("{not json")
    assert read_manifest(tmp_path, "run.json") is None
    (tmp_path / "run.json").write_text("[1, 2]")
    assert read_manifest(tmp_path, "run.json") is None
    (tmp_path / "run.json").write_text('{"seed": 3}')
    assert read_manifest(tmp_path, "run.json") == {"seed": 3}


class FakeTraining:
    """A stand-in for `train_into` that writes fake endpoint weights, returns a manifest and records its calls."""

    def __init__(self, endpoints=("first", "second/nested"), fail: bool = False):
        self.endpoints = endpoints
        self.fail = fail
        self.calls = []

    def __call__(self, work_dir):
        self.calls.append(work_dir)
        for endpoint in self.endpoints:
            (work_dir / endpoint).mkdir(parents=True)
            (work_dir / endpoint / "model.safetensors").write_bytes(f"weights {len(self.calls)}".encode())
        if self.fail:
            raise KeyboardInterrupt
        return {"run": len(self.calls), "num_threads": torch.get_num_threads()}


def run_cached(output_path, train_into, cache_key, **kwargs):
    options = {
        "cache_key": cache_key, "manifest_name": "run.json", "endpoint_folders": ("first", "second/nested"),
        "kind": "test run", "progress": False,
    }  # fmt: skip
    return train_or_reuse(output_path, train_into, **{**options, **kwargs})


def test_cache_trains_then_reuses(tmp_path):
    training = FakeTraining()
    manifest = run_cached(tmp_path / "run", training, {"seed": 0})
    assert len(training.calls) == 1
    assert manifest == {"run": 1, "num_threads": torch.get_num_threads(), "cache_key": {"seed": 0}}
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == manifest
    assert (tmp_path / "run" / "second" / "nested" / "model.safetensors").read_bytes() == b"weights 1"

    again = run_cached(tmp_path / "run", training, {"seed": 0})
    assert len(training.calls) == 1
    assert again == manifest
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_cache_retrains_other_key(tmp_path):
    training = FakeTraining()
    run_cached(tmp_path / "run", training, {"seed": 0})
    manifest = run_cached(tmp_path / "run", training, {"seed": 1})
    assert len(training.calls) == 2
    assert manifest["cache_key"] == {"seed": 1}
    assert (tmp_path / "run" / "first" / "model.safetensors").read_bytes() == b"weights 2"
    # Neither the partial folder nor the retired older run is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX only")
def test_cache_removes_killed_runs_folders(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    killed = [tmp_path / f".run-partial-{dead_pid}-abc", tmp_path / f".run-old-{dead_pid}-def"]
    running = tmp_path / f".run-partial-{os.getpid()}-ghi"
    for folder in (*killed, running):
        (folder / "first").mkdir(parents=True)

    run_cached(tmp_path / "run", FakeTraining(), {"seed": 0})

    for folder in killed:
        assert not folder.exists()
    assert running.is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == [running.name, "run"]


def test_cache_retrains_missing_weights(tmp_path):
    training = FakeTraining()
    run_cached(tmp_path / "run", training, {"seed": 0})
    (tmp_path / "run" / "second" / "nested" / "model.safetensors").unlink()
    run_cached(tmp_path / "run", training, {"seed": 0})
    assert len(training.calls) == 2
    assert (tmp_path / "run" / "second" / "nested" / "model.safetensors").is_file()


def test_cache_interruption_keeps_previous_run(tmp_path):
    run_cached(tmp_path / "run", FakeTraining(), {"seed": 0})
    with pytest.raises(KeyboardInterrupt):
        run_cached(tmp_path / "run", FakeTraining(fail=True), {"seed": 1})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert read_manifest(tmp_path / "run", "run.json")["cache_key"] == {"seed": 0}


def test_cache_interruption_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_cached(tmp_path / "run", FakeTraining(fail=True), {"seed": 0})
    assert list(tmp_path.iterdir()) == []


def test_cache_rejects_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(ValueError, match=r"is not a test run \(no readable run.json\)"):
        run_cached(tmp_path, FakeTraining(), {"seed": 0})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_cache_rejects_file_path(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        run_cached(tmp_path / "run", FakeTraining(), {"seed": 0})


def test_cache_sets_and_restores_threads(tmp_path):
    manifest = run_cached(tmp_path / "run", FakeTraining(), {"seed": 0}, num_threads=2)
    assert manifest["num_threads"] == 2
    assert torch.get_num_threads() == 1


def test_cache_folder_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        run_cached(tmp_path / "run", FakeTraining(), {"seed": 0})
    finally:
        os.umask(previous)
    # tempfile.mkdtemp alone would leave the folder at 0o700.
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
