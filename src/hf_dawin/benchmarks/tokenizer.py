"""Build the real CLIP tokenizer offline from the BPE file shipped in the `open-clip-torch` wheel.

CLIP's tokenizer is defined by a byte-level BPE: every byte maps to a printable unicode character, a word
ends with the suffix `</w>`, and the merge list is the first 48,894 merges (49,152 - 256 - 2) of
`bpe_simple_vocab_16e6.txt.gz`. The vocabulary lists the 256 byte characters, the same characters with
`</w>`, one token per merge in merge order, then `<|startoftext|>` (id 49406) and `<|endoftext|>`
(id 49407): 49,408 tokens. This module writes that definition as the `vocab.json` and `merges.txt` files
that `transformers.CLIPTokenizer.from_pretrained` reads.
"""

import gzip
import json
import os
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.utils import logging

from .assets import AssetError, fetch_wheel, read_wheel_member


logger = logging.get_logger(__name__)

OPEN_CLIP_WHEEL = ("open-clip-torch", "3.3.0")
OPEN_CLIP_BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"

CLIP_VOCAB_SIZE = 49_408
CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
CLIP_BOS_TOKEN_ID = 49_406
CLIP_EOS_TOKEN_ID = 49_407
# CLIP pads with the end-of-text token.
CLIP_PAD_TOKEN_ID = CLIP_EOS_TOKEN_ID
CLIP_MODEL_MAX_LENGTH = 77

_NUM_MERGES = 49_152 - 256 - 2
_END_OF_WORD = "</w>"
# The first line of the BPE file is a version header, as in the `merges.txt` files on the Hub.
_MERGES_HEADER = "#version: 0.2"
_CHECK_TEXT = "a photo of a dog."
_CHECK_IDS = [49406, 320, 1125, 539, 320, 1929, 269, 49407]


def byte_to_unicode_table() -> dict[int, str]:
    """Return the byte-level BPE mapping from each byte value to one printable unicode character.

    Bytes that are printable Latin-1 characters (`!` to `~`, `¡` to `¬`, `®` to `ÿ`) map to themselves.
    The remaining 68 bytes (control characters, space, soft hyphen and so on) map, in increasing byte
    order, to the code points 256, 257, ... so no token contains whitespace or control characters.

    Returns:
        `dict[int, str]`: 256 entries, with the printable bytes first (in byte order) and the remapped bytes
        after them. The first 256 vocabulary entries follow this order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


def clip_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's vocabulary and merge list from the text of `bpe_simple_vocab_16e6.txt`.

    Args:
        bpe_text (`str`): the decompressed BPE file: a header line, then one merge per line as two symbols
            separated by a space.

    Returns:
        `tuple[dict[str, int], list[str]]`: the token-to-id vocabulary (49,408 entries) and the 48,894 merges
        as `"left right"` strings, in priority order.

    Raises:
        AssetError: if the file has fewer merges than CLIP uses or a merge line is not two symbols.
    """
    lines = bpe_text.split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]
    if len(merges) != _NUM_MERGES:
        raise AssetError(f"The BPE file has {len(lines) - 1} merge lines; CLIP needs at least {_NUM_MERGES}.")
    for number, merge in enumerate(merges, start=2):
        if len(merge.split(" ")) != 2:
            raise AssetError(f"Line {number} of the BPE file is {merge!r}; expected two symbols separated by a space.")

    byte_symbols = list(byte_to_unicode_table().values())
    tokens = byte_symbols + [symbol + _END_OF_WORD for symbol in byte_symbols]
    tokens += [merge.replace(" ", "") for merge in merges]
    tokens += [CLIP_BOS_TOKEN, CLIP_EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise AssetError(f"The BPE file yields {len(vocab)} distinct tokens; CLIP's vocabulary has {CLIP_VOCAB_SIZE}.")
    return vocab, merges


def write_clip_tokenizer_files(output_dir: str | os.PathLike, bpe_text: str) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for CLIP's tokenizer into `output_dir`.

    Args:
        output_dir (`str` or `os.PathLike`): the folder to write into; created when missing.
        bpe_text (`str`): the decompressed `bpe_simple_vocab_16e6.txt`.

    Returns:
        `tuple[Path, Path]`: the paths of `vocab.json` and `merges.txt`.
    """
    vocab, merges = clip_vocab_and_merges(bpe_text)
    output_path = Path(output_dir)
    output_path.mkdir(parents=True, exist_ok=True)
    vocab_path = output_path / "vocab.json"
    merges_path = output_path / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("\n".join([_MERGES_HEADER, *merges]) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(
    output_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    model_max_length: int = CLIP_MODEL_MAX_LENGTH,
) -> CLIPTokenizer:
    """Build CLIP's tokenizer from the `open-clip-torch==3.3.0` wheel and save it in `output_dir`.

    The tokenizer is loaded with `CLIPTokenizer.from_pretrained(output_dir)`. Passing the two files as
    `vocab_file=`/`merges_file=` keywords is not equivalent: in transformers 5.25 the tokenizer built that way
    has only the special tokens in its vocabulary and encodes every character as the unknown token. After
    loading, `"a photo of a dog."` must encode to
    `[49406, 320, 1125, 539, 320, 1929, 269, 49407]`, as with OpenAI's CLIP tokenizer, or an error is raised.

    Args:
        output_dir (`str` or `os.PathLike`): the folder that receives `vocab.json`, `merges.txt` and the files
            `save_pretrained` writes.
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder for the wheel; defaults to
            `default_cache_dir()`.
        model_max_length (`int`, *optional*, defaults to 77): the longest sequence the tokenizer truncates or
            pads to; set it to the text tower's `max_position_embeddings`.

    Returns:
        `CLIPTokenizer`: the loaded tokenizer (bos 49406, eos and pad 49407).

    Example:

    ```python
    >>> from hf_dawin.benchmarks.tokenizer import build_clip_tokenizer
    >>> tokenizer = build_clip_tokenizer("clip-tokenizer")
    >>> tokenizer("a photo of a dog.")["input_ids"]
    [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    ```
    """
    if not isinstance(model_max_length, int) or model_max_length < 3:
        raise ValueError(f"`model_max_length` must be an integer of at least 3, received {model_max_length!r}.")

    wheel = fetch_wheel(*OPEN_CLIP_WHEEL, cache_dir=cache_dir)
    bpe_text = gzip.decompress(read_wheel_member(wheel, OPEN_CLIP_BPE_MEMBER)).decode("utf-8")
    write_clip_tokenizer_files(output_dir, bpe_text)

    tokenizer = CLIPTokenizer.from_pretrained(output_dir, model_max_length=model_max_length)
    encoded = tokenizer(_CHECK_TEXT)["input_ids"]
    if encoded != _CHECK_IDS:
        raise AssetError(
            f"The CLIP tokenizer built in {output_dir} encodes {_CHECK_TEXT!r} as {encoded}, expected {_CHECK_IDS}. "
            "The installed transformers or tokenizers version reads vocab.json and merges.txt differently."
        )
    tokenizer.save_pretrained(output_dir)
    logger.info("Saved the CLIP tokenizer in %s", output_dir)
    return tokenizer


__all__ = [
    "CLIP_BOS_TOKEN_ID",
    "CLIP_EOS_TOKEN_ID",
    "CLIP_MODEL_MAX_LENGTH",
    "CLIP_PAD_TOKEN_ID",
    "CLIP_VOCAB_SIZE",
    "build_clip_tokenizer",
    "byte_to_unicode_table",
    "clip_vocab_and_merges",
    "write_clip_tokenizer_files",
]
