"""Shared fixtures: tiny CLIP endpoints, a tiny real CLIP tokenizer, and offline settings."""

import json
import logging
import os

# Tests never reach the Hub: a miss fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402


TINY_IMAGE_SIZE = 16
TINY_CLASS_NAMES = ["cat", "dog", "bird", "fish"]
TINY_TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _tiny_vocab() -> dict[str, int]:
    """Byte-level CLIP vocabulary without merges: every byte, every byte ending a word, two special tokens."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab)}


TINY_VOCAB_SIZE = len(_tiny_vocab())


def tiny_clip_config(**vision_overrides) -> CLIPConfig:
    """A CLIP config small enough for unit tests, with real CLIP special-token ids for the tiny vocabulary."""
    vocab_size = TINY_VOCAB_SIZE
    vision = dict(
        image_size=TINY_IMAGE_SIZE, patch_size=4, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4,
    )
    vision.update(vision_overrides)
    text = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


@torch.no_grad()
def make_clip(seed: int, config: CLIPConfig | None = None, base: CLIPModel | None = None, noise: float = 0.05) -> CLIPModel:
    """Build a tiny CLIPModel; with `base`, a perturbed copy of it (a stand-in fine-tuned endpoint)."""
    torch.manual_seed(seed)
    config = config or tiny_clip_config()
    model = CLIPModel(config).eval()
    if base is not None:
        model.load_state_dict(base.state_dict())
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter) * (parameter.detach().abs().mean() + 0.1))
    return model


def assert_save_rejected(model, folder, setting: str, value, message: str) -> None:
    """Check that a save after setting `model.config.<setting>` raises and leaves an earlier save intact.

    The ValueError must match `message`, and the files that `model` saved into `folder` first must be unchanged.
    """
    model.save_pretrained(folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    setattr(model.config, setting, value)
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(folder)

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    (directory / "vocab.json").write_text(json.dumps(_tiny_vocab()))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer_dir) -> CLIPProcessor:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_tokenizer_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_endpoints():
    zero_shot = make_clip(0)
    fine_tuned = make_clip(1, base=zero_shot, noise=0.3)
    return zero_shot, fine_tuned


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory, tiny_endpoints, tiny_processor):
    """Both tiny endpoints saved as ordinary CLIP checkpoints with their processor."""
    root = tmp_path_factory.mktemp("tiny_pair")
    paths = []
    for name, model in zip(("zero_shot", "fine_tuned"), tiny_endpoints):
        path = root / name
        model.save_pretrained(path)
        tiny_processor.save_pretrained(path)
        paths.append(path)
    return tuple(paths)


@pytest.fixture()
def tiny_model(tiny_pair_dirs):
    from hf_dawin import DaWinCLIPModel

    return DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
    )


@pytest.fixture()
def pixel_values():
    generator = torch.Generator().manual_seed(123)
    return torch.randn(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


class RecordWarnings(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def transformers_warnings():
    """Warnings and errors logged by transformers (its logger does not propagate to pytest's caplog)."""
    handler = RecordWarnings()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)
