"""Tokenizers read from checkpoint files: llama2.c ``tok*.bin`` and GGUF vocabularies.

Two families cover the offline checkpoints lmppl reads without Hugging Face files:

* :class:`Llama2cTokenizer`, sentencepiece-style BPE over scored pieces. Encoding is the
  llama2.c rule: optional BOS; for non-empty text a dummy-prefix ``" "`` piece; each UTF-8
  code point becomes its piece if the vocabulary has it, else its bytes through byte
  fallback (``<0xNN>``); then, repeatedly, the adjacent pair whose concatenation is a piece
  with the highest score is merged (leftmost first on ties) until no pair merges. llama.cpp's
  ``"llama"`` (sentencepiece) GGUF vocabularies follow the same rule once their ``"▁"`` is
  read as a space, so they are built with this class too.
* :class:`ByteLevelBPETokenizer`, GPT-2-style byte-level BPE (``tokenizer.ggml.model ==
  "gpt2"``, e.g. SmolLM2), built as a :class:`tokenizers.Tokenizer` from the GGUF token list
  and merges, with the pre-tokenizer the file's ``tokenizer.ggml.pre`` flavour names.

Both implement the :class:`lmppl.lm.base.Tokenizer` protocol.
"""

from __future__ import annotations

import heapq
import os
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

__all__ = [
    "ByteLevelBPETokenizer",
    "Llama2cTokenizer",
    "load_llama2c_tokenizer",
    "no_chat_template_message",
    "render_chat_template",
    "tokenizer_from_gguf_metadata",
]

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


def no_chat_template_message(name: str) -> str:
    """The one-line error of ``apply_chat_template`` on a model without a chat template."""
    return (
        f"{name} has no chat template (no chat_template in tokenizer_config.json, no "
        "chat_template.jinja, no tokenizer.chat_template in a GGUF file): prompt it with plain "
        "text or token ids, or pass chat_template='...'"
    )


def render_chat_template(
    tokenizer: Any,
    name: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    tokenize: bool,
    kwargs: dict[str, Any],
) -> str | list[int]:
    """``tokenizer.apply_chat_template`` of a ``transformers`` tokenizer for one conversation:
    the text, or its token ids as ``list[int]`` (nothing added beyond what the template
    writes); a one-line ``ValueError`` when there is no template."""
    if getattr(tokenizer, "chat_template", None) is None and kwargs.get("chat_template") is None:
        raise ValueError(no_chat_template_message(name))
    if not messages or not isinstance(messages[0], Mapping):
        raise ValueError(
            "apply_chat_template takes one conversation: a non-empty list of "
            '{"role": ..., "content": ...} messages'
        )
    rendered = tokenizer.apply_chat_template(
        list(messages),
        add_generation_prompt=add_generation_prompt,
        tokenize=tokenize,
        return_dict=False,
        **kwargs,
    )
    return [int(i) for i in rendered] if tokenize else rendered


# llama.cpp's token types (``tokenizer.ggml.token_type``).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Llama2cTokenizer:
    """Sentencepiece-style BPE over scored pieces, encoded and decoded by llama2.c's rules.

    Args:
      pieces: the byte string of every token id, ``[V]``.
      scores: merge score of every token id, ``[V]``; higher merges first.
      bos_token_id, eos_token_id, unknown_token_id: the special ids (``None`` if absent).
      special_token_ids: ids never produced from text and dropped by
        ``decode(skip_special_tokens=True)`` (BOS, EOS, unknown, control tokens).
      add_dummy_prefix: encode non-empty text with a leading ``" "`` piece.
      add_bos_token: whether this vocabulary's model expects a BOS (``encode`` adds one only
        when both this and its ``add_bos`` argument are true).

    Pieces of the form ``<0xNN>`` are the byte-fallback pieces: byte ``b`` of a code point
    that has no piece of its own encodes as the id of ``<0xb>``, and decodes as that raw byte.
    """

    def __init__(
        self,
        pieces: Sequence[bytes],
        scores: Sequence[float],
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        unknown_token_id: int | None = None,
        special_token_ids: Sequence[int] = (),
        add_dummy_prefix: bool = True,
        add_bos_token: bool = True,
        chat_template: str | None = None,
        name: str = "this tokenizer",
    ):
        if len(pieces) != len(scores):
            raise ValueError(f"{len(pieces)} pieces but {len(scores)} scores")
        self.pieces = [bytes(piece) for piece in pieces]
        self.scores = [float(score) for score in scores]
        self.vocab_size = len(self.pieces)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unknown_token_id = unknown_token_id
        self.add_dummy_prefix = add_dummy_prefix
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.name = name
        self.special_token_ids = frozenset(
            i
            for i in (*special_token_ids, bos_token_id, eos_token_id, unknown_token_id)
            if i is not None
        )
        # byte value -> id of its fallback piece, and id -> byte value for decoding.
        self.byte_fallback_ids: dict[int, int] = {}
        self.byte_of_id: dict[int, int] = {}
        for token_id, piece in enumerate(self.pieces):
            match = _BYTE_PIECE.fullmatch(piece)
            if match and token_id not in self.special_token_ids:
                byte = int(match.group(1), 16)
                self.byte_fallback_ids.setdefault(byte, token_id)
                self.byte_of_id[token_id] = byte
        # Pieces that text can turn into: everything but special and byte-fallback pieces.
        self.id_of_piece: dict[bytes, int] = {}
        for token_id, piece in enumerate(self.pieces):
            if token_id not in self.special_token_ids and token_id not in self.byte_of_id:
                self.id_of_piece.setdefault(piece, token_id)

    def __repr__(self) -> str:
        return f"Llama2cTokenizer(vocab_size={self.vocab_size})"

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """Refused in one line: llama2.c vocabularies have no chat template, and a
        sentencepiece GGUF vocabulary's template is not rendered here (its control tokens
        are not matched in text by this tokenizer); load the model's Hugging Face folder."""
        if self.chat_template is None:
            raise ValueError(no_chat_template_message(self.name))
        raise ValueError(
            f"{self.name}: chat templates of sentencepiece GGUF vocabularies are not supported "
            "(only byte-level BPE GGUF vocabularies and Hugging Face tokenizers); load the "
            "model's Hugging Face folder for its chat template"
        )

    def _initial_ids(self, text: str) -> list[int]:
        """Dummy prefix, then one piece per code point or its byte-fallback pieces."""
        ids: list[int] = []
        units = [" ", *text] if self.add_dummy_prefix else list(text)
        for character in units:
            encoded = character.encode("utf-8")
            token_id = self.id_of_piece.get(encoded)
            if token_id is not None:
                ids.append(token_id)
                continue
            for byte in encoded:
                fallback = self.byte_fallback_ids.get(byte, self.unknown_token_id)
                if fallback is None:
                    raise ValueError(f"cannot encode byte 0x{byte:02X}: no byte piece and no <unk>")
                ids.append(fallback)
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Greedy highest-score pair merges, leftmost first on ties, in O(n log n).

        Symbols form a linked list keyed by their position in ``ids``; the heap holds
        candidate pairs ``(-score, left position, left id, right position, right id)``; a
        popped pair whose two symbols have changed since it was pushed is stale and skipped.
        Popping the smallest ``(-score, left position)`` is exactly llama2.c's rescan for the
        best pair, because positions keep the left-to-right order of the symbols.
        """
        count = len(ids)
        if count < 2:
            return ids
        symbol = list(ids)
        next_position = list(range(1, count + 1))
        previous_position = list(range(-1, count - 1))
        alive = [True] * count
        candidates: list[tuple[float, int, int, int, int]] = []

        def push(left: int, right: int) -> None:
            merged = self.id_of_piece.get(self.pieces[symbol[left]] + self.pieces[symbol[right]])
            if merged is not None:
                pair = (-self.scores[merged], left, symbol[left], right, symbol[right])
                heapq.heappush(candidates, pair)

        for position in range(count - 1):
            push(position, position + 1)
        while candidates:
            _, left, left_id, right, right_id = heapq.heappop(candidates)
            stale = not (alive[left] and alive[right] and next_position[left] == right)
            if stale or symbol[left] != left_id or symbol[right] != right_id:
                continue
            symbol[left] = self.id_of_piece[self.pieces[left_id] + self.pieces[right_id]]
            alive[right] = False
            after = next_position[right]
            next_position[left] = after
            if after < count:
                previous_position[after] = left
                push(left, after)
            if previous_position[left] >= 0:
                push(previous_position[left], left)
        return [symbol[position] for position in range(count) if alive[position]]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``: ``[BOS] + pieces``; BOS if ``add_bos`` and the model uses one."""
        prefix = (
            [self.bos_token_id]
            if add_bos and self.add_bos_token and self.bos_token_id is not None
            else []
        )
        if not text:
            return prefix
        return prefix + self._merge(self._initial_ids(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` ``[T]``: the piece after a BOS loses its leading space, ``<0xNN>``
        pieces are raw bytes, and invalid UTF-8 becomes U+FFFD."""
        text = bytearray()
        previous = None
        for token_id in (int(i) for i in ids):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"token id {token_id} is outside the vocabulary of {self.vocab_size}"
                )
            if token_id in self.special_token_ids:
                if not skip_special_tokens:
                    # llama2.c stores BOS/EOS as "\n<s>\n"; show the bare name.
                    text += self.pieces[token_id].strip()
            elif token_id in self.byte_of_id:
                text.append(self.byte_of_id[token_id])
            else:
                piece = self.pieces[token_id]
                if (
                    previous is not None
                    and previous == self.bos_token_id
                    and piece.startswith(b" ")
                ):
                    piece = piece[1:]
                text += piece
            previous = token_id
        return text.decode("utf-8", errors="replace")


def load_llama2c_tokenizer(path: str | os.PathLike) -> Llama2cTokenizer:
    """Read a llama2.c ``tok*.bin``: int32 max piece length, then per id a float32 score,
    an int32 byte length and the piece's bytes. Ids 0, 1, 2 are ``<unk>``, BOS, EOS."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        data = file.read()
    name = os.path.basename(path)
    if len(data) < 4:
        raise ValueError(f"{name}: not a llama2.c tokenizer (file of {len(data)} bytes)")
    (max_piece_length,) = struct.unpack_from("<i", data, 0)
    offset, pieces, scores = 4, [], []
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{name}: truncated llama2.c tokenizer at entry {len(pieces)}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or length > max(max_piece_length, 16) or offset + length > len(data):
            raise ValueError(
                f"{name}: corrupt llama2.c tokenizer at entry {len(pieces)} (length {length})"
            )
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    if len(pieces) < 3:
        raise ValueError(f"{name}: llama2.c tokenizer with only {len(pieces)} entries")
    return Llama2cTokenizer(
        pieces, scores, bos_token_id=1, eos_token_id=2, unknown_token_id=0, name=name
    )


class ByteLevelBPETokenizer:
    """GPT-2-style byte-level BPE (a :class:`tokenizers.Tokenizer` inside).

    Attributes:
      backend: the :class:`tokenizers.Tokenizer`; control tokens such as ``<|im_start|>`` are
        special added tokens, so they are matched whole in text.
      add_bos_token: whether this model expects a BOS (``encode`` adds one only when both
        this and its ``add_bos`` argument are true; SmolLM2 expects none).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        name: str = "this tokenizer",
    ):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.name = name
        self._chat_tokenizer: Any = None

    def __repr__(self) -> str:
        return f"ByteLevelBPETokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS first when ``add_bos`` and the model uses one)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` ``[T]``."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the GGUF file's ``tokenizer.chat_template``, by
        ``transformers``' ``apply_chat_template`` (over a copy of this tokenizer).

        Same arguments and results as :meth:`lmppl.lm.hf.HFTokenizer.apply_chat_template`:
        token ids (``tokenize=True``, ready as an ``lmppl.LM`` prompt) or the text.
        """
        if self.chat_template is None and kwargs.get("chat_template") is None:
            raise ValueError(no_chat_template_message(self.name))
        if self._chat_tokenizer is None:
            from transformers import PreTrainedTokenizerFast

            def token(token_id: int | None) -> str | None:
                return None if token_id is None else self.backend.id_to_token(token_id)

            self._chat_tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=tokenizers.Tokenizer.from_str(self.backend.to_str()),
                bos_token=token(self.bos_token_id),
                eos_token=token(self.eos_token_id),
                chat_template=self.chat_template,
            )
        return render_chat_template(
            self._chat_tokenizer, self.name, messages, add_generation_prompt, tokenize, kwargs
        )


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(flavour: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenizer for ``tokenizer.ggml.pre == flavour`` (llama-vocab.cpp).

    ``"smollm"`` (and StarCoder's family) first isolates every digit, then applies GPT-2's
    split -- as SmolLM2's own ``tokenizer.json`` does with ``Digits(individual_digits=True)``.
    """

    def split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if flavour in ("default", "gpt2", "gpt-2"):
        return gpt2
    if flavour in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if flavour in ("llama3", "llama-v3", "llama-bpe"):
        return split_then_bytes(_LLAMA3_SPLIT)
    if flavour in ("qwen2", "deepseek-r1-qwen"):
        return split_then_bytes(_QWEN2_SPLIT)
    raise ValueError(
        f"unsupported GGUF pre-tokenizer {flavour!r}; supported: default, gpt2, smollm, "
        "starcoder, refact, codeshell, llama3, llama-v3, llama-bpe, qwen2, deepseek-r1-qwen"
    )


def _byte_level_tokenizer(metadata: Mapping[str, Any]) -> ByteLevelBPETokenizer:
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    token_types = list(metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are matched whole and are "special";
    # user-defined ones are matched whole but kept by decode.
    backend.add_special_tokens(
        [
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            tokenizers.AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"GGUF vocabulary of {len(tokens)} tokens built a tokenizer of "
            f"{backend.get_vocab_size(with_added_tokens=True)} (duplicate tokens?)"
        )
    return ByteLevelBPETokenizer(
        backend,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _sentencepiece_tokenizer(metadata: Mapping[str, Any]) -> Llama2cTokenizer:
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" not in metadata:
        raise ValueError("GGUF sentencepiece vocabulary without tokenizer.ggml.scores")
    token_types = list(metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    special = [i for i, kind in enumerate(token_types) if kind in (_UNKNOWN, _CONTROL, _UNUSED)]
    return Llama2cTokenizer(
        [token.replace("\u2581", " ").encode("utf-8") for token in tokens],
        list(metadata["tokenizer.ggml.scores"]),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        unknown_token_id=metadata.get("tokenizer.ggml.unknown_token_id"),
        special_token_ids=special,
        add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def tokenizer_from_gguf_metadata(
    metadata: Mapping[str, Any],
) -> ByteLevelBPETokenizer | Llama2cTokenizer:
    """The tokenizer a GGUF file's ``tokenizer.ggml.*`` metadata describes.

    Args:
      metadata: GGUF key/value metadata with plain Python values (lists of ``str`` for the
        token and merge arrays), as :func:`lmppl.lm.gguf_reader.read_gguf_metadata` gives.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(
            "GGUF file has no tokenizer.ggml.tokens: no vocabulary to build a tokenizer"
        )
    if kind == "gpt2":
        return _byte_level_tokenizer(metadata)
    if kind == "llama":
        return _sentencepiece_tokenizer(metadata)
    raise ValueError(
        f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (byte-level BPE), "
        "'llama' (sentencepiece)"
    )
