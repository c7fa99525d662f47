"""The CLIP byte-level BPE tokenizer, read from the standard `vocab.json` + `merges.txt`.

Why our own: training needs token ids without importing `transformers` (a ComfyUI install has it, a bare
`controlnet_core` install need not), and SD checkpoints do not ship a tokenizer, so the files are found
on disk (see `locate.py`). The text pipeline is the one Hugging Face's CLIP tokenizer and therefore
ComfyUI use: NFC, runs of whitespace -> one space, lower case (character by character), a split into
letter runs / single digits / runs of other symbols / English contractions, then BPE with `</w>` marking
a word's end. Sequences are laid out as every SD text encoder expects:
`<|startoftext|> tokens[:75] <|endoftext|> pad...`, 77 ids; SD1.x's CLIP-L pads with `<|endoftext|>`,
the OpenCLIP models (SD2.x, SDXL's second encoder) pad with id 0.
"""
from __future__ import annotations

import json
import logging
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch

from ..errors import ControlNetError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77  # positions of every SD text encoder: start + 75 tokens + end
_CONTRACTIONS = ("'re", "'ve", "'ll", "'s", "'t", "'m", "'d")  # longest first; the text is lower case


class TokenizerError(ControlNetError):
    """Tokenizer files missing or unreadable."""


def byte_symbols() -> list[str]:
    """The byte -> printable character table of byte-level BPE: printable Latin-1 bytes stand for themselves,
    the other 68 bytes (controls, space, soft hyphen, ...) take the characters from U+0100 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def _kind(ch: str) -> str:
    if ch.isspace():
        return "space"
    cat = unicodedata.category(ch)
    return "letter" if cat[0] == "L" else "number" if cat[0] == "N" else "other"


def split_words(text: str) -> list[str]:
    """Normalised text -> pre-tokens: letter runs, single digits, runs of other symbols, contractions, specials."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        for special in (START, END):
            if text.startswith(special, i):
                out.append(special)
                i += len(special)
                break
        else:
            ch = text[i]
            kind = _kind(ch)
            if ch == "'" and any(text.startswith(c, i) for c in _CONTRACTIONS):
                c = next(c for c in _CONTRACTIONS if text.startswith(c, i))
                out.append(c)
                i += len(c)
            elif kind == "space":
                i += 1
            elif kind == "number":
                out.append(ch)
                i += 1
            else:  # a run of letters, or a run of other symbols (which stops at a special token)
                j = i + 1
                while j < n and _kind(text[j]) == kind and not (kind == "other" and text.startswith((START, END), j)):
                    j += 1
                out.append(text[i:j])
                i = j
    return out


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", lower case per character (no context rules such as Greek final sigma)."""
    text = unicodedata.normalize("NFC", text)
    text = " ".join(text.split())  # str.split() splits on runs of any Unicode whitespace
    return "".join(ch.lower() for ch in text)


class CLIPTokenizer:
    """Byte-level BPE over a CLIP vocabulary (49,408 entries for every SD text encoder)."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], source: str = "<in memory>"):
        self.vocab = vocab
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.source = source
        missing = [t for t in (START, END) if t not in vocab]
        if missing:
            raise TokenizerError(f"{source}: the vocabulary has no {missing}; this is not a CLIP vocabulary.")
        self.start_id, self.end_id = vocab[START], vocab[END]
        self._bytes = byte_symbols()
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def from_dir(cls, directory: PathLike) -> "CLIPTokenizer":
        """Read `vocab.json` and `merges.txt` (the first line, `#version: ...`, is a header)."""
        d = Path(directory)
        vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise TokenizerError(f"{d}: no {p.name}; a CLIP tokenizer folder holds vocab.json and merges.txt.")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{vocab_path}: not a readable JSON vocabulary ({e}). Replace the file.") from None
        merges = []
        for n, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line or (n == 1 and line.startswith("#")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{merges_path}, line {n}: expected two symbols, found {line!r}. Replace the file.")
            merges.append((parts[0], parts[1]))
        log.debug("CLIP tokenizer from %s: %d entries, %d merges", d, len(vocab), len(merges))
        return cls(vocab, merges, source=str(d))

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens and without truncation."""
        ids: list[int] = []
        for word in split_words(normalize(text)):
            if word in (START, END):
                ids.append(self.vocab[word])
                continue
            mapped = "".join(self._bytes[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab.get(s, self.end_id) for s in self._bpe(mapped))  # unknown symbols: the unk token
        return ids

    def sequence(self, text: str, pad_id: int, length: int = CONTEXT_LENGTH) -> list[int]:
        """`<start> ids[:length-2] <end>` padded with `pad_id` to `length` (longer prompts are truncated)."""
        body = self.encode(text)[: length - 2]
        ids = [self.start_id, *body, self.end_id]
        return ids + [pad_id] * (length - len(ids))

    def __call__(self, prompts: Iterable[str], pad_id: int, length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """(B, length) int64 token ids."""
        return torch.tensor([self.sequence(p, pad_id, length) for p in prompts], dtype=torch.long)


__all__ = ["CLIPTokenizer", "TokenizerError", "CONTEXT_LENGTH", "normalize", "split_words", "byte_symbols"]
