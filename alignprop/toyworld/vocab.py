"""The toy world's CLIP tokenizer files: a hand-built vocabulary where every grammar word is one token.

CLIP's tokenizer is byte-level BPE. The vocabulary holds every byte symbol (alone and word-final), so any
text still tokenizes (unknown words fall back to characters), plus the merges that join each grammar
word into a single token. Merges are found by simulating BPE and adding, for every word that does not
yet come out whole, the merge of its first two pieces, until every word does.

`t5_tokenizer` is the character-level T5 tokenizer of the flow model's null T5 and of the tiny SD3/FLUX pipelines.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import T5Tokenizer

from alignprop.toyworld.captions import grammar_words

END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 16  # tokens per prompt, start and end included; captions need 9
T5_LENGTH = 512  # the model_max_length of SD3's and FLUX's T5 tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of CLIP's byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes]))


def word_symbols(word: str) -> list[str]:
    symbols = list(word)
    symbols[-1] += END_OF_WORD
    return symbols


def apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as CLIP does it: repeatedly join the adjacent pair with the best (lowest) merge rank."""
    pieces = word_symbols(word)
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges, in rank order, under which every word of `words` is a single token."""
    merges: list[tuple[str, str]] = []
    while True:
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        split = [pieces for pieces in (apply_bpe(word, ranks) for word in words) if len(pieces) > 1]
        if not split:
            return merges
        for pieces in split:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                merges.append(pair)
                ranks[pair] = len(ranks)


def vocabulary(merges: list[tuple[str, str]]) -> list[str]:
    """Byte symbols, alone and word-final (as CLIP's vocab starts), then every merge result, then specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars]
    tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in tokens))
    return tokens + list(SPECIAL_TOKENS)


def write_tokenizer_files(directory: Path, words: list[str] | None = None) -> list[str]:
    """Write vocab.json and merges.txt into `directory`; return the vocabulary in id order."""
    merges = build_merges(words or grammar_words())
    tokens = vocabulary(merges)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, indent=0))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    return tokens


def t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 tokenizer: Unigram over every printable ASCII character and SentencePiece's "▁".

    Ids as T5's: <pad>=0, </s>=1, <unk>=2; other characters become <unk>. (transformers 5's T5Tokenizer
    is the tokenizers-backed class, T5TokenizerFast an alias; it saves tokenizer.json, no spiece.model.)
    """
    pieces = ["▁"] + [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(piece, -1.0) for piece in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_LENGTH)
