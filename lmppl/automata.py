"""Token-level automata for regular expressions and JSON schemas: constraints as potentials.

:func:`regex` compiles a pattern (matched against the *whole* generated text) into a
:class:`TokenAutomaton` over a tokenizer's vocabulary; :func:`json_schema` first turns a
JSON schema into such a pattern. :func:`lmppl.potentials.constrain` puts an automaton in a
program: the target is

    σ(s) ∝ p0(s) · 1[text(s) ∈ L] · (other factors),

with ``text(s)`` the decoded text of the tokens before the first EOS (all ``T`` tokens when
the sequence has none within ``max_new_tokens``), so ``log Z`` of the bare constraint is the
log-probability that p0's text, stopped at EOS or after ``max_new_tokens``, lies in L.

How it is built (all on the host, once, outside any program):

1. ``interegular`` turns the pattern into a deterministic automaton over characters
   (lookaheads are intersected exactly; an unsupported construct is a one-line error).
   outlines-core's ``json_schema.build_regex_from_schema`` turns a schema into a pattern.
   (outlines-core's own token ``Index`` is not used: version 0.2.14 drops the transitions
   that leave an accepting state towards a non-accepting one, so ``(ab)+`` accepts only
   ``ab`` — see ``tests/infer/test_automaton_potentials.py``.)
2. Every token's text is walked through the character automaton from every state reached
   at a token boundary (all tokens at once, one numpy gather per character position):
   the state after token v from state q, or −1.
3. States from which no accepting state can be reached are dropped; ``distance[q]`` is the
   fewest tokens that lead from q to an accepting state.
4. Tokens that act alike from every state share a class (partition refinement, one state
   at a time, never materialising ``[S, V]``): the automaton is stored as
   ``class_transitions [S, C]`` and ``token_class [V]``. On SmolLM2's 49,152 tokens a date
   pattern has 3 classes, an e-mail pattern 26 and a small JSON object 137, so schemas
   with thousands of states stay small; a step reads ``class_transitions[q][token_class]``
   (one ``[V]`` gather per particle, as a dense row would).

Tokens are matched by their text: special tokens (BOS, EOS, control tokens) never match,
and tokens whose bytes are not valid UTF-8 on their own (pieces of a multi-byte character)
are not allowed, so a constrained sequence spells its non-ASCII characters with whole-
character tokens.

A pattern whose class table ``[S, C]`` int32 exceeds ``max_table_bytes`` is refused with a
one-line error naming its size.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AutomatonPotential",
    "DEFAULT_MAX_TABLE_BYTES",
    "TokenAutomaton",
    "json_schema",
    "regex",
    "token_texts",
]

DEFAULT_MAX_TABLE_BYTES = 1 << 29
"""Largest class transition table ``[S, C]`` (bytes) :func:`regex` builds (512 MiB)."""

_UNREACHABLE = np.iinfo(np.int32).max


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters, strict=True)}


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def token_texts(tokenizer: Any) -> list[str | None]:
    """The text each token id contributes to a decoded sequence (None: never matched).

    Special tokens and tokens that are not valid UTF-8 alone are None. Supports lmppl's
    tokenizers (``CharTokenizer``, ``Llama2cTokenizer``, ``ByteLevelBPETokenizer``).
    """
    from lmppl.lm.table import CharTokenizer
    from lmppl.lm.tokenizers import ByteLevelBPETokenizer, Llama2cTokenizer

    texts: list[str | None]
    if isinstance(tokenizer, CharTokenizer):
        texts = list(tokenizer.pieces)
    elif isinstance(tokenizer, Llama2cTokenizer):
        texts = [
            None
            if i in tokenizer.special_token_ids
            else _utf8(bytes([tokenizer.byte_of_id[i]]))
            if i in tokenizer.byte_of_id
            else _utf8(piece)
            for i, piece in enumerate(tokenizer.pieces)
        ]
    elif isinstance(tokenizer, ByteLevelBPETokenizer):
        backend = tokenizer.backend
        decoder = _byte_decoder()
        added = backend.get_added_tokens_decoder()
        texts = []
        for i in range(tokenizer.vocab_size):
            token = backend.id_to_token(i)
            if i in added:
                texts.append(None if added[i].special else added[i].content)
            elif token is None or any(c not in decoder for c in token):
                texts.append(None)
            else:
                texts.append(_utf8(bytes(decoder[c] for c in token)))
    else:
        raise TypeError(
            f"cannot read the token texts of a {type(tokenizer).__name__}; give a "
            "CharTokenizer, Llama2cTokenizer or ByteLevelBPETokenizer (or a model with one)"
        )
    for special in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if special is not None:
            texts[special] = None
    return texts


class _Vocabulary:
    """A tokenizer's token texts laid out for a vectorised walk (built once per tokenizer).

    Tokens with a text are sorted by length, longest first, so that the tokens still
    walking at character position j are a prefix: ``columns[j]`` holds the index (into
    ``characters``) of character j of the first ``len(columns[j])`` tokens.

    Attributes:
      token_ids: ``[M]`` the ids of the tokens with a text, longest first.
      characters: the distinct characters of the vocabulary.
      columns: ``[len_j]`` int32 arrays, one per character position.
    """

    def __init__(self, texts: Sequence[str | None]):
        ids = [i for i, text in enumerate(texts) if text is not None]
        ids.sort(key=lambda i: -len(texts[i] or ""))
        self.token_ids = np.asarray(ids, np.int64)
        position: dict[str, int] = {}
        longest = len(texts[ids[0]] or "") if ids else 0
        rows: list[list[int]] = [[] for _ in range(longest)]
        for token_id in ids:
            for j, character in enumerate(texts[token_id] or ""):
                rows[j].append(position.setdefault(character, len(position)))
        self.characters = list(position)
        self.columns = [np.asarray(row, np.int32) for row in rows]


# The vocabulary of the last few tokenizers (reading a 49k vocabulary takes about a
# second; one tokenizer usually serves several patterns). Entries keep their tokenizer
# alive, so an id is never reused while cached.
_VOCABULARIES: dict[int, tuple[Any, _Vocabulary]] = {}
_VOCABULARY_CACHE_SIZE = 4


def _vocabulary(tokenizer: Any) -> _Vocabulary:
    entry = _VOCABULARIES.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        while len(_VOCABULARIES) >= _VOCABULARY_CACHE_SIZE:
            del _VOCABULARIES[next(iter(_VOCABULARIES))]
        entry = _VOCABULARIES[id(tokenizer)] = (tokenizer, _Vocabulary(token_texts(tokenizer)))
    return entry[1]


class _Walker:
    """Every token's text walked through a character automaton at once (numpy).

    ``table [K + 1, A]`` is the character automaton's moves with the states that cannot
    reach acceptance (and missing moves) sent to the absorbing dead state K.
    """

    def __init__(self, fsm: Any, live: set, vocabulary: _Vocabulary):
        self.states = list(fsm.states)
        self.index = {state: i for i, state in enumerate(self.states)}
        self.dead = len(self.states)
        alphabet = fsm.alphabet
        symbols = max(alphabet.values()) + 1
        self.table = np.full((self.dead + 1, symbols), self.dead, np.int32)
        for state, moves in fsm.map.items():
            for symbol, target in moves.items():
                if target in live:
                    self.table[self.index[state], symbol] = self.index[target]
        symbol_of = np.asarray([alphabet[c] for c in vocabulary.characters], np.int32)
        self.columns = [symbol_of[column] for column in vocabulary.columns]
        self.token_ids = vocabulary.token_ids

    def moves(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids, character state numbers)`` of the tokens whose text can be read
        from state number ``start`` without leaving the live states (an empty text stays
        at ``start``)."""
        current = np.full(len(self.token_ids), start, np.int32)
        for column in self.columns:
            head = current[: len(column)]
            current[: len(column)] = self.table[head, column]
        allowed = current != self.dead
        return self.token_ids[allowed], current[allowed]


def _character_automaton(pattern: str) -> Any:
    import interegular

    try:
        return interegular.parse_pattern(pattern).to_fsm()
    except Exception as error:  # interegular raises bare Exception for some patterns
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"cannot compile the regular expression {pattern!r}: "
            f"{type(error).__name__}{': ' + detail if detail else ''}"
        ) from None


def _live_states(fsm: Any) -> set:
    """Character states from which an accepting state can be reached."""
    reverse: dict[Any, set] = {}
    for state, moves in fsm.map.items():
        for target in moves.values():
            reverse.setdefault(target, set()).add(state)
    live, queue = set(fsm.finals), deque(fsm.finals)
    while queue:
        for previous in reverse.get(queue.popleft(), ()):
            if previous not in live:
                live.add(previous)
                queue.append(previous)
    return live


class TokenAutomaton:
    """A deterministic automaton over token ids (built by :func:`regex` / :func:`json_schema`).

    Attributes:
      class_transitions: ``[S, C]`` int32, the state after a token of class c from state q,
        or −1 (not allowed: its text leaves the language, or it is special). State 0 is
        the start.
      token_class: ``[V]`` int32, each token's class (tokens of one class move alike from
        every state).
      accepting: ``[S]`` bool, the text so far is in the language.
      distance: ``[S]`` int32, the fewest tokens from q to an accepting state.
      eos_token_id: the tokenizer's EOS (allowed in accepting states by the potential).
      pattern: the regular expression.
    """

    def __init__(
        self,
        class_transitions: np.ndarray,
        token_class: np.ndarray,
        accepting: np.ndarray,
        distance: np.ndarray,
        eos_token_id: int | None,
        pattern: str,
    ):
        self.class_transitions = np.asarray(class_transitions, np.int32)
        self.token_class = np.asarray(token_class, np.int32)
        self.accepting = np.asarray(accepting, bool)
        self.distance = np.asarray(distance, np.int32)
        self.eos_token_id = eos_token_id
        self.pattern = pattern
        # Device copies, made once: the sweep reads them as constants.
        self.device_class_transitions = jnp.asarray(self.class_transitions)
        self.device_token_class = jnp.asarray(self.token_class)
        self.device_accepting = jnp.asarray(self.accepting)
        self.device_distance = jnp.asarray(self.distance)

    @property
    def transitions(self) -> np.ndarray:
        """The dense ``[S, V]`` int32 table (built on demand: S · V entries)."""
        return self.class_transitions[:, self.token_class]

    @property
    def num_classes(self) -> int:
        return int(self.class_transitions.shape[1])

    @property
    def num_states(self) -> int:
        return int(self.class_transitions.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.token_class.shape[0])

    def __repr__(self) -> str:
        return (
            f"TokenAutomaton({self.pattern!r}, states={self.num_states}, "
            f"classes={self.num_classes}, vocab_size={self.vocab_size})"
        )

    def run(self, token_ids: Sequence[int]) -> int:
        """The state after ``token_ids`` (stopping at EOS), −1 once a token is not allowed."""
        state = 0
        for token in (int(v) for v in token_ids):
            if token == self.eos_token_id:
                break
            state = int(self.class_transitions[state, self.token_class[token]])
            if state < 0:
                return -1
        return state

    def accepts(self, token_ids: Sequence[int]) -> bool:
        """Whether the text of ``token_ids`` (up to the first EOS) is in the language."""
        state = self.run(token_ids)
        return state >= 0 and bool(self.accepting[state])

    def bind(self, steps: int, eos_token_id: int | None) -> AutomatonPotential:
        """The per-step potential of this constraint for ``steps`` new tokens."""
        return AutomatonPotential(self, steps, eos_token_id)


class AutomatonPotential:
    """The :class:`~lmppl.types.StatefulStepPotential` of a :class:`TokenAutomaton`.

    State: the automaton state (int32 ``[]``, −1 once dead). At step t (0-based, T steps)
    a token v is allowed iff its move is defined and leads to a state at most
    ``T − 1 − t`` tokens from acceptance; EOS is allowed iff the state accepts. The product
    of these indicators over a sequence (up to its first EOS) is ``1[text(s) ∈ L]``: every
    prefix of an accepted sequence passes them, and the last token (or EOS) of a passing
    sequence ends in an accepting state. Masking every step (not only the last) makes the
    proposal the locally optimal one for the constraint and removes dead ends early.
    """

    def __init__(self, automaton: TokenAutomaton, steps: int, eos_token_id: int | None):
        self.automaton = automaton
        self.steps = int(steps)
        self.eos_token_id = eos_token_id

    def init(self) -> jax.Array:
        return jnp.zeros((), jnp.int32)

    def log_weights(self, state: jax.Array, prefix: jax.Array, t: jax.Array) -> jax.Array:
        del prefix
        automaton = self.automaton
        alive = state >= 0
        here = jnp.maximum(state, 0)
        row = automaton.device_class_transitions[here][automaton.device_token_class]
        remaining = self.steps - 1 - t
        allowed = alive & (row >= 0)
        allowed = allowed & (automaton.device_distance[jnp.maximum(row, 0)] <= remaining)
        if self.eos_token_id is not None:
            allowed = allowed.at[self.eos_token_id].set(alive & automaton.device_accepting[here])
        return jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.float32)

    def update(self, state: jax.Array, token: jax.Array, t: jax.Array) -> jax.Array:
        del t
        automaton = self.automaton
        following = automaton.device_class_transitions[
            jnp.maximum(state, 0), automaton.device_token_class[token]
        ]
        if self.eos_token_id is not None:
            following = jnp.where(token == self.eos_token_id, state, following)
        return jnp.where(state >= 0, following, -1).astype(jnp.int32)


def _tokenizer_and_size(tokenizer_or_model: Any) -> tuple[Any, int]:
    tokenizer = getattr(tokenizer_or_model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer_or_model, "vocab_size"):
        return tokenizer, int(tokenizer_or_model.vocab_size)  # a model: its logits' width
    if hasattr(tokenizer_or_model, "encode") and hasattr(tokenizer_or_model, "vocab_size"):
        return tokenizer_or_model, int(tokenizer_or_model.vocab_size)
    raise TypeError(
        f"expected a tokenizer or a model with one, got {type(tokenizer_or_model).__name__}"
    )


def regex(
    pattern: str,
    tokenizer_or_model: Any,
    *,
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
) -> TokenAutomaton:
    """The token automaton of ``pattern`` (a full match of the generated text).

    Args:
      pattern: a regular expression (Python syntax as ``interegular`` reads it; no
        anchors: the whole text must match).
      tokenizer_or_model: an lmppl model (its vocabulary size is the table's width) or a
        tokenizer.
      max_table_bytes: refuse a class table ``[S, C]`` int32 larger than this.

    Raises:
      ValueError: the pattern does not compile, no token sequence matches it, or its
        table is too large (one line each).
    """
    tokenizer, vocab_size = _tokenizer_and_size(tokenizer_or_model)
    fsm = _character_automaton(pattern)
    live = _live_states(fsm)
    if fsm.initial not in live:
        raise ValueError(f"the regular expression {pattern!r} matches no text")
    walker = _Walker(fsm, live, _vocabulary(tokenizer))
    # Token-level states are the character states reached at token boundaries, numbered
    # in breadth-first order from the start (state 0).
    start = walker.index[fsm.initial]
    number = np.full(walker.dead + 1, -1, np.int64)
    number[start] = 0
    order = [start]
    rows: list[tuple[np.ndarray, np.ndarray]] = []  # (token ids, target states) per state
    queue = deque([start])
    while queue:
        token_ids, targets = walker.moves(queue.popleft())
        for target in np.unique(targets).tolist():
            if number[target] < 0:
                number[target] = len(order)
                order.append(target)
                queue.append(target)
        rows.append((token_ids, number[targets]))
    accepting = np.asarray([walker.states[i] in fsm.finals for i in order], bool)
    distance = _distances(rows, accepting)
    if distance[0] == _UNREACHABLE:
        raise ValueError(f"no token sequence of this vocabulary spells a text matching {pattern!r}")
    # Keep the states that can still reach acceptance token by token (a character state
    # may be live while no token lands on a continuation).
    keep = np.flatnonzero(distance != _UNREACHABLE)
    renumber = np.full(len(order), -1, np.int64)
    renumber[keep] = np.arange(len(keep))
    columns = [_column(rows[old], renumber, vocab_size) for old in keep]
    token_class, representatives = _token_classes(columns, vocab_size)
    size = len(keep) * len(representatives) * 4
    if size > max_table_bytes:
        raise ValueError(
            f"the automaton of {_short(pattern)} has {len(keep)} states × "
            f"{len(representatives)} token classes: a table of {size / 2**20:.0f} MiB exceeds "
            f"max_table_bytes={max_table_bytes / 2**20:.0f} MiB"
        )
    class_transitions = np.stack([column[representatives] for column in columns])
    return TokenAutomaton(
        class_transitions,
        token_class,
        accepting[keep],
        distance[keep],
        tokenizer.eos_token_id,
        pattern,
    )


def _column(
    row: tuple[np.ndarray, np.ndarray], renumber: np.ndarray, vocab_size: int
) -> np.ndarray:
    """One state's moves as a ``[V]`` int32 array (−1: not allowed)."""
    column = np.full(vocab_size, -1, np.int32)
    token_ids, targets = row
    column[token_ids] = renumber[targets]
    return column


def _token_classes(columns: list[np.ndarray], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(token_class [V], representatives [C])``: tokens with equal moves from every state.

    Partition refinement, one state at a time: split each class by the token's move from
    that state. ``representatives[c]`` is a token of class c.
    """
    token_class = np.zeros(vocab_size, np.int64)
    for column in columns:
        pairs = token_class * (len(columns) + 2) + (column.astype(np.int64) + 1)
        _, token_class = np.unique(pairs, return_inverse=True)
    _, representatives = np.unique(token_class, return_index=True)
    return token_class.astype(np.int32), representatives


def _short(pattern: str, limit: int = 60) -> str:
    return repr(pattern if len(pattern) <= limit else pattern[: limit - 3] + "...")


def _distances(rows: list[tuple[np.ndarray, np.ndarray]], accepting: np.ndarray) -> np.ndarray:
    """Fewest tokens from each state to an accepting one (breadth first, backwards)."""
    reverse: list[set[int]] = [set() for _ in rows]
    for state, (_, targets) in enumerate(rows):
        for target in np.unique(targets).tolist():
            reverse[target].add(state)
    distance = np.full(len(rows), _UNREACHABLE, np.int64)
    queue = deque(np.flatnonzero(accepting).tolist())
    distance[list(queue)] = 0
    while queue:
        state = queue.popleft()
        for previous in reverse[state]:
            if distance[previous] == _UNREACHABLE:
                distance[previous] = distance[state] + 1
                queue.append(previous)
    return distance


def json_schema(
    schema: str | Mapping[str, Any],
    tokenizer_or_model: Any,
    *,
    whitespace_pattern: str | None = None,
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
) -> TokenAutomaton:
    """The token automaton of the JSON documents valid under ``schema``.

    The schema (a JSON string or a dict) becomes a regular expression through
    outlines-core's ``build_regex_from_schema`` (``whitespace_pattern``: the pattern of the
    whitespace allowed between tokens, ``[ ]?`` by default there), then :func:`regex`.

    Raises:
      ValueError: the schema is not one outlines-core can turn into a regular expression
        (one line naming what it refused), or as :func:`regex`.
    """
    from outlines_core.json_schema import build_regex_from_schema

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        pattern = build_regex_from_schema(text, whitespace_pattern)
    except (ValueError, TypeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"cannot turn the JSON schema into a regular expression: {detail}"
        ) from None
    return regex(pattern, tokenizer_or_model, max_table_bytes=max_table_bytes)
