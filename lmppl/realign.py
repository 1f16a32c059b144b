"""DeRa: decoding-time realignment of a reference and an aligned model (Liu et al., 2024).

``realign(ref, aligned, λ)`` is a model object with the :class:`~lmppl.lm.LanguageModel`
interface, so it goes wherever a loaded model goes: ``lmppl.LM(realigned, prompt, T)``,
``lmppl.generate``, ``ImportanceSampling``/``SMC``/``TwistedSMC``/``Exact``. Each step runs
both networks on the same tokens, each against its own cache (the cache is the pair
:class:`RealignCache`, every leaf particle-axis leading, so ``reorder_cache`` and
``broadcast_cache`` apply unchanged), and returns

    m_t(v) = λ · log π_aligned(v | s_<t) + (1 − λ) · log π_ref(v | s_<t)

as its next-token logits, i.e. ``λ log_softmax(h_aligned) + (1 − λ) log_softmax(h_ref)``.
Its ``hidden`` is the reference model's final hidden state (what twists read).

Two modes give two targets:

* ``mode="token"`` (the paper's per-token approximation): p0 is the per-step law
  ``π_λ(v | s_<t) = softmax(m_t)(v) = softmax(λ h_aligned + (1 − λ) h_ref)(v)``; an
  ordinary normalised language model. λ = 0 is the reference, λ = 1 the aligned model,
  λ > 1 extrapolates.
* ``mode="global"``: the exact sequence-level geometric mixture

      σ_λ(s) = π_ref(s)^(1−λ) π_aligned(s)^λ / Z_λ,    π(s) = Π_t π(s_t | s_<t),

  which is the KL-regularised optimum at strength β/λ when ``aligned`` is the optimum at
  β. The model is not ``locally_normalised``: its logits are read as per-token
  log-weights of the unnormalised target, ``log p̃0(s) = Σ_t m_t(s_t) = (1−λ) log
  π_ref(s) + λ log π_aligned(s)`` (see :mod:`lmppl.decoding`). ``LM.log_prob``, ``Exact``
  and NumPyro's ``log_density`` therefore see p̃0; ``Exact``'s ``log_marginal`` is
  ``log Z_λ``. The SMC sweep proposes from ``softmax(m_t)`` (the token-mode law) and
  adds the increment ``log Σ_v exp m_t(v)``, so its weights target σ_λ (times any other
  factor of the program) exactly and ``Ẑ`` is unbiased for ``Z_λ``. ``LM.sample`` and
  ``lmppl.generate`` of a global-mode model draw from the token-mode law (the proposal),
  not from σ_λ: use a weighted backend for that. The temperature must be 1.

λ is a float32 leaf of ``realigned.params`` (:class:`RealignParams`), so a sweep over λ
is one ``jax.vmap`` over parameters, e.g.::

    r = lmppl.realign(ref, aligned, 0.0)
    log_p = jax.vmap(lambda lam: lmppl.LM(r, prompt, T, params=r.with_lam(r.params, lam))
                     .log_prob(tokens))(lams)

    # SMC: vmap the compiled sweep (its model parameters: a dict keyed by model name).
    structure, sweep, arrays, _ = lmppl.infer.SMC(program, N).compile()
    def log_z(lam, key):
        params = structure.model_params({r.name: r.with_lam(r.params, lam)})
        return sweep(key, params, None, arrays, None).log_marginal
    log_zs = jax.vmap(log_z)(lams, keys)

Backends and ``generate`` read ``r.params``: ``r.params = r.with_lam(r.params, lam)`` sets
λ there without recompiling anything.

Two T5 checkpoints (:mod:`lmppl.lm.t5`) realign the same way, conditioned on one source:
``lmppl.LM(r, source=x, max_new_tokens=T)``; each model runs its own encoder on ``x``.

The two models must share a vocabulary (same size and, when both have tokenizers, the
same encoding of probe strings, the same piece for each id, and the same BOS/EOS ids);
their context lengths may differ (the shorter one is used).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.lm.base import LMOutput

__all__ = ["RealignCache", "RealignParams", "Realigned", "mix_logits", "realign"]

MODES = ("token", "global")

_PROBES = (
    "Once upon a time, there was a little girl named Lily.",
    "abcd",
    "Hello world! 1234 ÄÖü é 你好\n\tend",
)


class RealignParams(NamedTuple):
    """Parameters of a realigned model (a pytree).

    Fields:
      ref: the reference model's parameters.
      aligned: the aligned model's parameters.
      lam: ``[]`` float32, the realignment strength λ.
    """

    ref: Any
    aligned: Any
    lam: jax.Array


class RealignCache(NamedTuple):
    """The pair of caches (each with its particle axis leading on every leaf).

    Fields:
      ref: the reference model's cache.
      aligned: the aligned model's cache.
    """

    ref: Any
    aligned: Any

    @property
    def length(self) -> jax.Array:
        """``[B]`` positions already written in each row (the two caches agree)."""
        return self.ref.length


def _lam_array(lam: Any) -> jax.Array:
    """λ as a float32 scalar array; finite when its value is known."""
    array = jnp.asarray(lam, jnp.float32)
    if array.shape != ():
        raise ValueError(f"λ must be a scalar (vmap over it for a sweep), got shape {array.shape}")
    if not isinstance(array, jax.core.Tracer) and not bool(jnp.isfinite(array)):
        raise ValueError(f"λ must be finite, got {lam!r}")
    return array


def _scaled(weight: jax.Array, log_probs: jax.Array) -> jax.Array:
    """``weight · log_probs`` with ``0 · (−inf) = 0`` (a zero weight ignores that model)."""
    return jnp.where(weight == 0, 0.0, weight * log_probs)


def mix_logits(lam: jax.Array, ref_logits: jax.Array, aligned_logits: jax.Array) -> jax.Array:
    """``λ log_softmax(aligned) + (1 − λ) log_softmax(ref)`` in float32 (last axis = vocab)."""
    lam = jnp.asarray(lam, jnp.float32)
    log_ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    log_aligned = jax.nn.log_softmax(aligned_logits.astype(jnp.float32), axis=-1)
    return _scaled(lam, log_aligned) + _scaled(1.0 - lam, log_ref)


def _outcome(call, *args) -> Any:
    """The result of ``call(*args)``, or the name of the exception it raised."""
    try:
        return call(*args)
    except Exception as error:  # any failure is part of the comparison
        return type(error).__name__


def _vocabulary_problem(ref: Any, aligned: Any) -> str | None:
    """Why the two models do not share a vocabulary, or None when they do."""
    if ref.vocab_size != aligned.vocab_size:
        return f"vocab_size {ref.vocab_size} (ref) vs {aligned.vocab_size} (aligned)"
    if ref.eos_token_id != aligned.eos_token_id:
        return f"EOS id {ref.eos_token_id} (ref) vs {aligned.eos_token_id} (aligned)"
    a, b = ref.tokenizer, aligned.tokenizer
    if a is None or b is None or a is b:
        return None
    for name in ("vocab_size", "bos_token_id", "eos_token_id"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        if x != y:
            return f"tokenizer {name} {x} (ref) vs {y} (aligned)"
    for probe in _PROBES:
        if _outcome(a.encode, probe) != _outcome(b.encode, probe):
            return f"the tokenizers encode {probe!r} differently"
    size = ref.vocab_size
    ids = range(size) if size <= 2048 else np.linspace(0, size - 1, 2048).astype(int).tolist()
    for i in ids:
        if _outcome(a.decode, [i], False) != _outcome(b.decode, [i], False):
            return f"the tokenizers decode id {i} differently"
    return None


def _encoder_decoder_problem(ref: Any, aligned: Any) -> str | None:
    """Why two models do not read one kind of prompt (both decoder-only, or both
    encoder-decoder with one decoder start token), or None."""
    kinds = [bool(getattr(m, "is_encoder_decoder", False)) for m in (ref, aligned)]
    if kinds[0] != kinds[1]:
        which = "ref" if kinds[0] else "aligned"
        return f"only the {which} model is an encoder-decoder (source-conditioned) model"
    if kinds[0] and ref.decoder_start_token_id != aligned.decoder_start_token_id:
        return (
            f"decoder start tokens {ref.decoder_start_token_id} (ref) vs "
            f"{aligned.decoder_start_token_id} (aligned)"
        )
    return None


class Realigned:
    """A DeRa model: reference and aligned networks mixed at strength λ (see module doc).

    Build it with :func:`realign`. It has the interface of
    :class:`~lmppl.lm.LanguageModel` (``config``, ``tokenizer``, ``params``, ``name``,
    ``init_cache``, ``apply``, ``astype``) and hashes by identity.

    Attributes:
      ref, aligned: the two loaded models.
      mode: ``"token"`` or ``"global"``.
      locally_normalised: False in global mode (the logits are per-token log-weights of
        the sequence target ``π_ref^(1−λ) π_aligned^λ``, see
        :meth:`next_token_log_weights`).
      params: :class:`RealignParams` ``(ref, aligned, lam)``.
      config: the reference's config with the shorter context length.
      tokenizer: the reference's tokenizer (the aligned one's if the reference has none).
    """

    def __init__(self, ref: Any, aligned: Any, lam: Any, mode: str = "token"):
        if mode not in MODES:
            raise ValueError(f"mode must be 'token' or 'global', got {mode!r}")
        for role, model in (("ref", ref), ("aligned", aligned)):
            if not hasattr(model, "apply") or not hasattr(model, "init_cache"):
                raise TypeError(
                    f"realign needs loaded language models; {role} is {type(model).__name__}"
                )
            if not model.locally_normalised:
                raise ValueError(f"cannot realign {model.name}: its logits are unnormalised")
        problem = _vocabulary_problem(ref, aligned)
        if problem is not None:
            raise ValueError(
                f"realign needs models with one vocabulary: {ref.name} and {aligned.name} "
                f"differ ({problem})"
            )
        problem = _encoder_decoder_problem(ref, aligned)
        if problem is not None:
            raise ValueError(f"cannot realign {ref.name} with {aligned.name}: {problem}")
        lam_array = _lam_array(lam)
        self.ref = ref
        self.aligned = aligned
        self.mode = mode
        self.config = ref.config.replace(
            context_length=min(ref.context_length, aligned.context_length)
        )
        self.tokenizer = ref.tokenizer if ref.tokenizer is not None else aligned.tokenizer
        self.params = RealignParams(ref.params, aligned.params, lam_array)
        lam_text = f"{float(lam_array):g}" if not isinstance(lam_array, jax.core.Tracer) else "λ"
        self.name = f"realign({ref.name}, {aligned.name}, λ={lam_text}, {mode})"

    def __repr__(self) -> str:
        return f"Realigned({self.name!r}, vocab={self.vocab_size}, context={self.context_length})"

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.ref.hidden_size

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def dtype(self) -> jnp.dtype:
        return self.ref.dtype

    @property
    def is_encoder_decoder(self) -> bool:
        """Both models are encoder-decoders (T5): ``lmppl.LM(r, source=...)``; each runs
        its own encoder on the shared source (packed prompt, see :mod:`lmppl.lm.t5`)."""
        return bool(getattr(self.ref, "is_encoder_decoder", False))

    @property
    def decoder_start_token_id(self) -> int | None:
        return getattr(self.ref, "decoder_start_token_id", None)

    def source_prompt(self, source: Any, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
        """The packed prompt of ``source`` (the reference's; both models check it)."""
        self.aligned.source_prompt(source, max_new_tokens)
        return self.ref.source_prompt(source, max_new_tokens)

    @property
    def locally_normalised(self) -> bool:
        """False in global mode: the logits are per-token log-weights m_t, not normalised."""
        return self.mode == "token"

    @property
    def eos_token_id(self) -> int | None:
        """The reference's EOS (both models share it, checked by :func:`realign`)."""
        return self.ref.eos_token_id

    def next_token_log_weights(self, logits: jax.Array, temperature: float) -> jax.Array:
        """``[..., V]`` float32 per-token log-weights of the target.

        Token mode: ``log softmax(logits / temperature)`` (an ordinary model). Global mode:
        the mixed logits themselves, ``m_t = λ log π_aligned + (1 − λ) log π_ref``, whose
        product over steps is the sequence target (temperature must be 1).
        """
        if self.locally_normalised:
            return self.ref.next_token_log_weights(logits, temperature)
        if temperature != 1:
            raise ValueError(
                f"{self.name} has unnormalised sequence-level logits: temperature must be 1, "
                f"got {temperature}"
            )
        return logits.astype(jnp.float32)

    @property
    def lam(self) -> jax.Array:
        """λ of the stored parameters."""
        return self.params.lam

    @staticmethod
    def with_lam(params: RealignParams, lam: Any) -> RealignParams:
        """``params`` with λ replaced (a float32 scalar; may be traced, e.g. under vmap)."""
        return params._replace(lam=_lam_array(lam))

    def init_cache(
        self, batch_size: int, max_length: int, dtype: Any | None = None
    ) -> RealignCache:
        """Both models' empty caches for ``batch_size`` rows of ``max_length`` positions."""
        if max_length > self.context_length:
            raise ValueError(
                f"a cache of {max_length} positions exceeds the context length "
                f"{self.context_length} of {self.name}"
            )
        return RealignCache(
            self.ref.init_cache(batch_size, max_length, dtype),
            self.aligned.init_cache(batch_size, max_length, dtype),
        )

    def apply(
        self,
        params: RealignParams,
        tokens: jax.Array,
        cache: RealignCache,
        token_counts: jax.Array | None = None,
    ) -> LMOutput:
        """Run both networks on ``tokens`` ``[B, S]``; logits ``m_t``, the ref's hidden."""
        ref_out = self.ref.apply(params.ref, tokens, cache.ref, token_counts)
        aligned_out = self.aligned.apply(params.aligned, tokens, cache.aligned, token_counts)
        logits = mix_logits(params.lam, ref_out.logits, aligned_out.logits)
        return LMOutput(
            logits=logits,
            hidden=ref_out.hidden,
            cache=RealignCache(ref_out.cache, aligned_out.cache),
        )

    def astype(self, dtype: Any) -> Realigned:
        """A copy whose networks' floating-point parameters are cast (λ stays float32)."""

        def cast(tree):
            return jax.tree.map(
                lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
            )

        other = object.__new__(Realigned)
        other.__dict__.update(self.__dict__)
        other.ref = self.ref.astype(dtype)
        other.aligned = self.aligned.astype(dtype)
        other.params = RealignParams(
            cast(self.params.ref), cast(self.params.aligned), self.params.lam
        )
        return other


def realign(ref: Any, aligned: Any, lam: float, *, mode: str = "token") -> Realigned:
    """DeRa: ``ref`` and ``aligned`` mixed at strength ``lam`` (λ), a drop-in model.

    Args:
      ref: the reference (e.g. SFT) model, ``lmppl.load(...)``.
      aligned: the aligned model, same vocabulary.
      lam: λ, any finite float (0 = ref, 1 = aligned, > 1 extrapolates); stored as a
        float32 leaf of ``params`` (change it with :meth:`Realigned.with_lam`).
      mode: ``"token"``: p0 = ``softmax(λ log π_aligned + (1 − λ) log π_ref)`` per step;
        ``"global"``: the unnormalised sequence target ``π_ref^(1−λ) π_aligned^λ``,
        reached exactly by the weighted backends (see the module docstring).

    Raises:
      ValueError: the vocabularies differ, λ is not finite, or the mode is unknown.
    """
    if isinstance(lam, float | int) and not math.isfinite(lam):
        raise ValueError(f"λ must be finite, got {lam!r}")
    return Realigned(ref, aligned, lam, mode=mode)
