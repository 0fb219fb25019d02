"""Tests for building CLIP's tokenizer from the open-clip-torch wheel."""

import json

import pytest
from transformers import CLIPTokenizer

from hf_dawin.benchmarks.tokenizer import (
    CLIP_BOS_TOKEN_ID,
    CLIP_EOS_TOKEN_ID,
    CLIP_VOCAB_SIZE,
    build_clip_tokenizer,
    byte_to_unicode_table,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    build_clip_tokenizer(directory, model_max_length=32)
    return directory


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = byte_to_unicode_table()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(character.isprintable() and not character.isspace() for character in table.values())
    assert table[ord("a")] == "a"
    # The first remapped byte (0x00) takes the first code point after Latin-1.
    assert table[0] == chr(256)
    assert table[ord(" ")] == "Ġ"


def test_tokenizer_encodes_reference_sentence(tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer("a photo of a dog.")["input_ids"] == [49406, 320, 1125, 539, 320, 1929, 269, 49407]


def test_tokenizer_vocabulary_layout(tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == CLIP_VOCAB_SIZE
    assert vocab["<|startoftext|>"] == CLIP_BOS_TOKEN_ID
    assert vocab["<|endoftext|>"] == CLIP_EOS_TOKEN_ID
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    assert merges[0].startswith("#version")
    assert len(merges) - 1 == 49152 - 256 - 2
    # The first merged token follows the 512 byte tokens.
    assert vocab[merges[1].replace(" ", "")] == 512


def test_tokenizer_special_ids_and_padding(tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.bos_token_id == CLIP_BOS_TOKEN_ID
    assert tokenizer.eos_token_id == CLIP_EOS_TOKEN_ID
    assert tokenizer.pad_token_id == CLIP_EOS_TOKEN_ID
    assert tokenizer.model_max_length == 32
    batch = tokenizer(["a handwritten seven.", "a photo of the number seven."], padding=True)["input_ids"]
    assert len(batch[0]) == len(batch[1])
    assert batch[0][-1] == CLIP_EOS_TOKEN_ID
    # Tokens are case-insensitive, as in CLIP.
    assert tokenizer("A Photo")["input_ids"] == tokenizer("a photo")["input_ids"]


def test_build_rejects_bad_max_length(tmp_path):
    with pytest.raises(ValueError, match="model_max_length"):
        build_clip_tokenizer(tmp_path, model_max_length=1)
