"""A word-level CLIP tokenizer for scene captions, generated in code (no download).

CLIP's tokenizer is byte-level BPE; a generated ``vocab.json`` holds every byte alone and
as a word end (so any text encodes) plus each caption word, and ``merges.txt`` builds
each word from its end, one character at a time: every merge's right side ends in
``</w>``, so merges only ever apply at a word's end, never inside another word, and every
caption word becomes exactly one token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from .data import ATTRIBUTES

__all__ = ["WORDS", "IDENTIFIERS", "MAX_LENGTH", "write_vocab", "scenes_tokenizer"]

#: Rare identifiers for DreamBooth-style concepts ("a sks shape"); never in base captions.
IDENTIFIERS = ("sks", "zwx", "ohwx")
_GLUE = ("a", "at", "the", "in", "on", "background", "shape", "of", "photo")
WORDS = tuple(dict.fromkeys([w for values in ATTRIBUTES.values() for v in values for w in v.split()]
                            + list(_GLUE) + list(IDENTIFIERS)))
#: Token length of every prompt (the tokenizer pads and truncates to it): captions are short.
MAX_LENGTH = 24


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def write_vocab(folder: Union[str, Path]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _byte_alphabet():
            vocab.setdefault(char + suffix, len(vocab))
    merges = []
    for word in WORDS:
        current = word[-1] + "</w>"
        for char in reversed(word[:-1]):
            merge = f"{char} {current}"
            if merge not in merges:
                merges.append(merge)
            current = char + current
            vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def scenes_tokenizer(folder: Union[str, Path]):
    """A ``CLIPTokenizer`` over a generated vocabulary (written to ``folder``)."""
    from transformers import CLIPTokenizer

    write_vocab(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
