"""Tokenizers: llama2.c's ``tok512.bin`` by its format rules, and GGUF vocabularies.

The llama2.c tokenizer is checked against hand-derived encodings, against a literal
transcription of llama2.c's quadratic merge loop (``encode`` in ``run.c``) on random text,
and on round trips. The GGUF builders are checked on small synthetic vocabularies whose
answers follow from the rules (the real SmolLM2 vocabulary is tested in ``test_gguf.py``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lmppl.lm.base import Tokenizer
from lmppl.lm.tokenizers import (
    ByteLevelBPETokenizer,
    Llama2cTokenizer,
    load_llama2c_tokenizer,
    tokenizer_from_gguf_metadata,
)

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K"
TOKENIZER_FILE = Path(os.environ.get("LMPPL_STORIES260K", ASSETS)) / "tok512.bin"
needs_tok512 = pytest.mark.skipif(not TOKENIZER_FILE.is_file(), reason=f"no {TOKENIZER_FILE}")
ROUND_TRIP_TEXTS = [
    "Once upon a time, there was a little dog.",
    'Tom said, "Let\'s go!"\nThe end.',
    "  two leading spaces and trailing  ",
    "café naïve Zoë façade",
    "emoji 😀🐶 and 日本語 and ∑ x²",
    "\t tab \r\n",
]


@pytest.fixture(scope="module")
def tok512() -> Llama2cTokenizer:
    return load_llama2c_tokenizer(TOKENIZER_FILE)


def llama2c_encode(tokenizer: Llama2cTokenizer, text: str, add_bos: bool) -> list[int]:
    """llama2.c's ``encode`` transcribed literally: rescan every pair after each merge."""
    lookup: dict[bytes, int] = {}
    for token_id, piece in enumerate(tokenizer.pieces):
        lookup.setdefault(piece, token_id)
    tokens = [1] if add_bos else []
    if text:
        tokens.append(lookup[b" "])
    for character in text:
        encoded = character.encode("utf-8")
        if encoded in lookup:
            tokens.append(lookup[encoded])
        else:
            tokens.extend(byte + 3 for byte in encoded)
    while True:
        best_score, best_id, best_index = -1e10, -1, -1
        for index in range(len(tokens) - 1):
            merged = lookup.get(
                tokenizer.pieces[tokens[index]] + tokenizer.pieces[tokens[index + 1]]
            )
            if merged is not None and tokenizer.scores[merged] > best_score:
                best_score, best_id, best_index = tokenizer.scores[merged], merged, index
        if best_index == -1:
            return tokens
        tokens[best_index : best_index + 2] = [best_id]


@needs_tok512
def test_tok512_special_ids_and_byte_fallback_ids(tok512):
    assert isinstance(tok512, Tokenizer)
    assert (tok512.vocab_size, tok512.bos_token_id, tok512.eos_token_id) == (512, 1, 2)
    assert tok512.byte_fallback_ids == {byte: byte + 3 for byte in range(256)}
    assert tok512.pieces[3 + 0x41] == b"<0x41>"


@needs_tok512
def test_tok512_known_encodings(tok512):
    piece = tok512.id_of_piece
    # "a": dummy prefix " " + "a", and " a" is a piece -> one merge.
    assert tok512.encode("a") == [1, piece[b" a"]]
    # " Once" arises as " "+"O" -> " O" (score -60), then " O"+"n" -> " On" (-62), then
    # "c"+"e" -> "ce" (-72), then " On"+"ce" -> " Once" (-144); likewise for the other words.
    ids = tok512.encode("Once upon a time")
    assert ids[0] == 1
    assert [tok512.pieces[i] for i in ids[1:]] == [b" Once", b" upon", b" a", b" time"]
    assert tok512.decode(ids) == "Once upon a time"
    # No piece for the emoji: its 4 UTF-8 bytes fall back to ids b + 3, after the dummy " ".
    assert tok512.encode("😀", add_bos=False) == [
        piece[b" "],
        0xF0 + 3,
        0x9F + 3,
        0x98 + 3,
        0x80 + 3,
    ]
    # "é" has a piece of its own (its two UTF-8 bytes), so no byte fallback.
    assert tok512.encode("é", add_bos=False) == [piece[b" "], piece["é".encode()]]
    assert tok512.encode("") == [1]
    assert tok512.encode("", add_bos=False) == []


@needs_tok512
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tok512_round_trips(tok512, text):
    ids = tok512.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tok512.decode(ids) == text
    # Without BOS the dummy-prefix space is part of the text (llama2.c drops it only after BOS).
    assert tok512.decode(tok512.encode(text, add_bos=False)) == " " + text


@needs_tok512
def test_tok512_decoding_rules(tok512):
    piece = tok512.id_of_piece
    story = tok512.encode("The end.")
    assert tok512.decode(story + [2]) == "The end."
    assert tok512.decode(story + [2], skip_special_tokens=False) == "<s>The end.</s>"
    # Only the piece right after BOS loses its space; a continuation keeps it.
    assert tok512.decode([piece[b" a"], piece[b" a"]]) == " a a"
    # Byte pieces are raw bytes: a lone lead byte is invalid UTF-8 -> U+FFFD.
    assert tok512.decode([1, 0xF0 + 3]) == "\ufffd"
    assert tok512.decode([1, 0xC3 + 3, 0xA9 + 3]) == "é"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok512.decode([512])


@needs_tok512
def test_tok512_heap_merges_equal_llama2c_rescans(tok512):
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'\"\n0123456789éüñ😀日"
    rng = random.Random(20240601)
    for trial in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        add_bos = trial % 2 == 0
        expected = llama2c_encode(tok512, text, add_bos)
        assert tok512.encode(text, add_bos=add_bos) == expected, repr(text)


def tiny_tokenizer(extra: dict[bytes, float], add_dummy_prefix: bool = False) -> Llama2cTokenizer:
    """<unk>, <s>, </s>, 256 byte pieces, then ``extra`` pieces with their scores."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)] + list(extra)
    scores = [0.0] * 259 + list(extra.values())
    return Llama2cTokenizer(
        pieces, scores, bos_token_id=1, eos_token_id=2, unknown_token_id=0,
        add_dummy_prefix=add_dummy_prefix,
    )  # fmt: skip


def test_merges_take_the_best_score_then_the_leftmost_pair():
    tokenizer = tiny_tokenizer({b"a": -9, b"b": -9, b"c": -9, b"ab": -2, b"bc": -1, b"aa": -1})
    names = lambda ids: [tokenizer.pieces[i] for i in ids]
    assert names(tokenizer.encode("abc", add_bos=False)) == [b"a", b"bc"]
    assert names(tokenizer.encode("aaa", add_bos=False)) == [b"aa", b"a"]
    assert names(tokenizer.encode("aaaa", add_bos=False)) == [b"aa", b"aa"]
    # "x" has no piece: it falls back to its byte piece.
    assert tokenizer.encode("x", add_bos=False) == [ord("x") + 3]


@needs_tok512
def test_sentencepiece_gguf_vocabulary_encodes_like_llama2c(tok512):
    """A llama.cpp "llama" vocabulary spells spaces as U+2581 and marks specials by type."""
    names = {0: "<unk>", 1: "<s>", 2: "</s>"}
    tokens = [
        names.get(i, piece.decode("utf-8").replace(" ", "\u2581"))
        for i, piece in enumerate(tok512.pieces)
    ]
    token_types = [2, 3, 3] + [6] * 256 + [1] * (512 - 259)
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": tok512.scores,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": True,
    }
    from_gguf = tokenizer_from_gguf_metadata(metadata)
    assert isinstance(from_gguf, Llama2cTokenizer) and from_gguf.vocab_size == 512
    for text in ROUND_TRIP_TEXTS:
        assert from_gguf.encode(text) == tok512.encode(text)
        assert from_gguf.decode(from_gguf.encode(text)) == text


def byte_level_metadata(pre: str, add_bos: bool = False) -> dict:
    """A GPT-2-style vocabulary: 3 control tokens, the 256 byte symbols, 3 merged tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    merged = ["Ġ1", "12", "hi"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_symbols, *merged]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ 1", "1 2", "h i"],
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": add_bos,
    }


def test_byte_level_pre_tokenizer_flavours_split_digits_as_llama_cpp_does():
    gpt2 = tokenizer_from_gguf_metadata(byte_level_metadata("gpt2"))
    smollm = tokenizer_from_gguf_metadata(byte_level_metadata("smollm"))
    assert isinstance(smollm, ByteLevelBPETokenizer) and smollm.vocab_size == 262
    spell = lambda tokenizer, text: [
        tokenizer.backend.id_to_token(i) for i in tokenizer.encode(text)
    ]
    # GPT-2's split keeps " 12" whole, so "Ġ 1" (the first merge) applies.
    assert spell(gpt2, " 12") == ["Ġ1", "2"]
    # SmolLM isolates every digit first: no merge can cross a digit.
    assert spell(smollm, " 12") == ["Ġ", "1", "2"]
    for tokenizer in (gpt2, smollm):
        assert tokenizer.decode(tokenizer.encode(" 12 hi ¿é😀")) == " 12 hi ¿é😀"


def test_byte_level_control_tokens_are_whole_and_bos_follows_the_flag():
    plain = tokenizer_from_gguf_metadata(byte_level_metadata("smollm"))
    hi = plain.backend.token_to_id("hi")
    assert plain.encode("<|im_start|>hi<|im_end|>") == [1, hi, 2]
    assert plain.decode([1, hi, 2]) == "hi"
    assert plain.decode([1, hi, 2], skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"
    assert plain.encode("hi") == [hi]  # the file says: no BOS
    with_bos = tokenizer_from_gguf_metadata(byte_level_metadata("smollm", add_bos=True))
    assert with_bos.encode("hi") == [1, hi] and with_bos.encode("hi", add_bos=False) == [hi]


def test_unsupported_gguf_vocabularies_give_one_line_errors():
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'tekken'; supported:"):
        tokenizer_from_gguf_metadata(byte_level_metadata("tekken"))
    metadata = dict(byte_level_metadata("gpt2"), **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'; supported:"):
        tokenizer_from_gguf_metadata(metadata)
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


def test_corrupt_tokenizer_files(tmp_path):
    truncated = tmp_path / "tok_truncated.bin"
    truncated.write_bytes(TOKENIZER_FILE.read_bytes()[:-3] if TOKENIZER_FILE.is_file() else b"")
    with pytest.raises(ValueError, match="llama2.c tokenizer") as error:
        load_llama2c_tokenizer(truncated)
    assert "\n" not in str(error.value)
