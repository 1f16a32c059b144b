"""The tiny models, targets and enumeration helpers the tests share, each built once.

* Language models: :func:`small_lm` (the table LM over ``<s> </s> a b c`` most tests use),
  :func:`eos_lm`, :func:`tnt_lm`, :func:`realign_pairs`, and :func:`table_lm` for any other
  table LM (a cached ``lmppl.table_lm``). Builders are cached: every test module gets the
  same object. Call them at import time (module level), never inside a traced function.
* Enumerable targets over :func:`small_lm` / :func:`eos_lm` (3 new tokens):
  :data:`TARGETS` and the programs in it.
* Enumeration: :func:`all_sequences`, :func:`brute_force`, :func:`log_z`, :func:`exact`,
  :func:`exact_kls`, :func:`frequencies`.
* PyTorch / Hugging Face references (torch and transformers imported on first use):
  :func:`make_twin` (a random ``transformers`` causal LM and its lmppl twin) and the
  ``save_*`` functions writing tiny random Hugging Face folders.

``tests/cli/tiny_targets.py`` keeps its own table LM: the CLI loads it by file path, also in
a subprocess outside the checkout, where ``tests`` is not importable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.scipy.special import logsumexp
from numpyro.infer.util import log_density

import lmppl
from lmppl import potentials
from lmppl.lm.base import LanguageModel

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------- language models

table_lm = functools.cache(lmppl.table_lm)
"""``lmppl.table_lm`` with its result cached per arguments (one object per configuration)."""


def small_lm() -> LanguageModel:
    """Vocab 5 (``<s> </s> a b c``), context 12, seed 1: the shared enumerable-target LM."""
    return table_lm(3, context_length=12, seed=1)


def eos_lm() -> LanguageModel:
    """Vocab 6 (``<s> </s> a b c d``), seed 2, scale 1.5: targets that stop at EOS."""
    return table_lm(4, context_length=12, seed=2, scale=1.5)


@functools.cache
def tnt_lm() -> LanguageModel:
    """A 2-layer random Llama over ``<s> </s> a b c d`` (the TNT tests' model)."""
    return lmppl.random_lm("llama", symbols=4, context_length=12, scale=2.0, seed=3)


@functools.cache
def realign_pairs() -> dict[str, tuple[LanguageModel, LanguageModel]]:
    """``(reference, aligned)`` pairs with one vocabulary (vocab 5: <s> </s> a b c): table
    LMs with different context lengths, and a Llama / GPT-2 pair (two cache pytrees)."""
    return {
        "table": (
            table_lm(3, context_length=12, seed=11),
            table_lm(3, context_length=10, seed=12, scale=1.5),
        ),
        "transformer": (
            lmppl.random_lm("llama", symbols=3, num_layers=1, seed=1, scale=2.0),
            lmppl.random_lm("gpt2", symbols=3, num_layers=1, seed=2, scale=2.0),
        ),
    }


# ------------------------------------------------------------------- enumerable targets
# Built here, at import: a builder must never run first inside a JAX trace (a program under
# jit), or the cached model would hold that trace's tracers.
SMALL_LM = small_lm()
EOS_LM = eos_lm()
# Vocabulary 5 (or 6 for the EOS target) and 3 new tokens: every sequence is enumerable.

ENDING = jnp.array([4, 2], jnp.int32)  # "ca", the observed ending of the infilling target


def soft_factor(ending=None):
    """log φ = 1.5·#c − 0.5·#a, up to 4.5 (rejection needs an envelope)."""
    s = numpyro.sample("s", lmppl.LM(SMALL_LM, "a", 3, stop_at_eos=False))
    numpyro.factor("likes_c", 1.5 * jnp.sum(s == 4) - 0.5 * jnp.sum(s == 2))


def threshold(ending=None):
    """A hard constraint: at most one "a"."""
    s = numpyro.sample("s", lmppl.LM(SMALL_LM, "ab", 3, stop_at_eos=False))
    numpyro.factor("few_a", potentials.threshold(jnp.sum(s == 2), 1))


def infilling(ending):
    """3 latent tokens after "a", then an observed 2-token ending."""
    s = numpyro.sample("s", lmppl.LM(SMALL_LM, "a", 3, stop_at_eos=False))
    prompt = lmppl.concat("a", s)
    numpyro.sample("ending", lmppl.LM(SMALL_LM, prompt, 2, stop_at_eos=False), obs=ending)


def short(ending=None):
    """Sequences that stop early (EOS) are preferred; log φ ≤ 0."""
    s = numpyro.sample("s", lmppl.LM(EOS_LM, "ab", 3))
    numpyro.factor("short", -0.7 * jnp.sum(s != 1))


def banned(ending=None):
    s = numpyro.sample("s", lmppl.LM(SMALL_LM, "a", 3, stop_at_eos=False))
    potentials.banned_tokens("no_b", s, [3], SMALL_LM.vocab_size)
    numpyro.factor("likes_c", 1.0 * jnp.sum(s == 4))


def classifier_c(ending=None):
    """φ(s) = p(c = 1 | s) = sigmoid(1.5·#c − 2): a classifier probability (log φ ≤ 0)."""
    s = numpyro.sample("s", lmppl.LM(SMALL_LM, "a", 3, stop_at_eos=False))
    numpyro.factor("clf", jax.nn.log_sigmoid(1.5 * jnp.sum(s == 4) - 2.0))


def classifier_c_not_a(ending=None):
    """φ = sigmoid(1.5·#c − 0.5·#a − 1): a probability, so FUDGE applies."""
    s = numpyro.sample("s", lmppl.LM(SMALL_LM, "a", 3, stop_at_eos=False))
    numpyro.factor("p_class", jax.nn.log_sigmoid(1.5 * jnp.sum(s == 4) - 0.5 * jnp.sum(s == 2) - 1))


TARGETS = {
    "soft_factor": (soft_factor, ()),
    "threshold": (threshold, ()),
    "infilling": (infilling, (ENDING,)),
    "eos": (short, ()),
    "banned_tokens": (banned, ()),
}
"""The inference tests' targets: ``name -> (program, args)``."""

# -------------------------------------------------------------------------- enumeration


def all_sequences(vocab: int, steps: int) -> np.ndarray:
    """Every token sequence ``[vocab**steps, steps]`` (int32), in lexicographic order."""
    return np.asarray(list(itertools.product(range(vocab), repeat=steps)), np.int32)


def brute_force(program, args, vocab_size: int, steps: int, site: str = "s"):
    """``(sequences [M, T], log σ̃ [M])`` from NumPyro's own ``log_density``."""
    sequences = all_sequences(vocab_size, steps)
    log_joint = np.array(
        [float(log_density(program, args, {}, {site: jnp.asarray(seq)})[0]) for seq in sequences]
    )
    return sequences, log_joint


def log_z(log_joint: np.ndarray) -> float:
    return float(logsumexp(jnp.asarray(log_joint)))


def exact(program, *args):
    return lmppl.infer.Exact(program).run(None, *args)


def exact_kls(program, *args) -> tuple[float, float, float]:
    """``(log Z, KL(p0‖σ), KL(σ‖p0))`` by enumeration: log σ/p0 = log φ − log Z."""
    result = exact(program, *args)
    log_z = float(result.log_marginal)
    log_phi = np.asarray(result.log_potential, np.float64)
    sigma = np.asarray(result.weights, np.float64)
    p0 = np.exp(np.asarray(result.log_weights, np.float64) - log_phi)
    kl_p0_sigma = float(np.sum(p0 * (log_z - log_phi)))
    kl_sigma_p0 = float(np.sum(sigma * (log_phi - log_z)))
    return log_z, kl_p0_sigma, kl_sigma_p0


def frequencies(samples: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Empirical frequency of each support row among ``samples`` ``[M, T]``."""
    index = {tuple(row): i for i, row in enumerate(support.tolist())}
    counts = np.zeros(len(support))
    for row in np.asarray(samples).tolist():
        counts[index[tuple(row)]] += 1
    return counts / len(samples)


# ------------------------------------------- PyTorch twins of lmppl networks (tests/lm)
# Each case is a PyTorch causal LM built from a small config, its weights re-drawn with a
# larger spread than Hugging Face's initialisation (std 0.02 makes every logit nearly the
# same, which would hide errors), and the lmppl network built from its state dict.

TWIN_VOCAB = 61
_SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2)
_SMALL = dict(vocab_size=TWIN_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
_LLAMA_LIKE = dict(_SMALL, num_attention_heads=4, max_position_embeddings=32)

TWIN_CASES = sorted(["llama", "llama_gqa_untied", "qwen2", "mistral", "gpt2", "gpt_neo"])


def hf_config(case: str) -> Any:
    """The ``transformers`` config of one twin case."""
    import transformers

    configs = {
        "llama": lambda: transformers.LlamaConfig(
            **_LLAMA_LIKE, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500.0
        ),
        "llama_gqa_untied": lambda: transformers.LlamaConfig(
            **_LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False
        ),
        "qwen2": lambda: transformers.Qwen2Config(
            **_LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False
        ),
        "mistral": lambda: transformers.MistralConfig(
            **_LLAMA_LIKE, num_key_value_heads=1, sliding_window=None, head_dim=8
        ),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=TWIN_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, **_SPECIAL_IDS
        ),
        "gpt_neo": lambda: transformers.GPTNeoConfig(
            vocab_size=TWIN_VOCAB,
            hidden_size=32,
            num_layers=4,
            num_heads=4,
            attention_types=[[["global", "local"], 2]],
            window_size=3,
            max_position_embeddings=32,
            **_SPECIAL_IDS,
        ),
    }
    return configs[case]()


def randomise_(
    model: torch.nn.Module, seed: int, spread: float = 0.15, unit_prefix: str | None = None
) -> torch.nn.Module:
    """Redraw every parameter: norm weights ~ 1 + N(0, 0.1²), parameters whose name starts
    with ``unit_prefix`` (a classifier head) ~ N(0, 1), the rest ~ N(0, spread²)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if name.endswith("weight") and parameter.ndim == 1:  # layer norms
                parameter.copy_(1.0 + 0.1 * noise)
            elif unit_prefix is not None and name.startswith(unit_prefix):
                parameter.copy_(noise)
            else:
                parameter.copy_(spread * noise)
    return model


@dataclasses.dataclass
class Twin:
    """A PyTorch reference model, its HF config dict and tensors, and the lmppl model."""

    torch_model: torch.nn.Module
    hf_config: dict
    tensors: dict[str, np.ndarray]
    lm: LanguageModel

    def torch_logits(self, tokens) -> np.ndarray:
        """Reference logits ``[B, S, V]`` of an unpadded batch."""
        import torch

        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
            return self.torch_model(input_ids=ids).logits.float().numpy()


@functools.cache
def make_twin(case: str, seed: int = 0) -> Twin:
    """The twin of one case (cached: one per case and seed for the whole session)."""
    import torch
    import transformers

    from lmppl.lm.build import build_network, config_from_hf

    reference_config = hf_config(case)
    reference_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(reference_config)
    model = randomise_(model, seed).eval()
    tensors = {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}
    config_dict = reference_config.to_dict()
    config = config_from_hf(config_dict)
    lm = LanguageModel(build_network(config, tensors), config, None, name=case)
    return Twin(model, config_dict, tensors, lm)


# ------------------------------------------------ tiny random Hugging Face folders
# Standing in for the paper's models (no download): a byte-level BPE tokenizer trained here
# (``<pad>`` = 0, ``<s>`` = 1 prepended, ``</s>`` = 2), a 2-layer GPT-2 LM (the shape of
# ``gpt2-medium`` / TinyStories) and 2-layer GPT-2 classifiers (a 1-output reward-model
# score like ``nicholasKluge/ToxicityModel``, or C classes like
# ``LiYuan/amazon-review-sentiment-analysis``). Weights are redrawn with a larger spread
# than Hugging Face's initialisation, so next-token laws and class probabilities differ.

HF_CORPUS = [
    "Once upon a time, there was a cat.",
    "I bought this and it was great.",
    "I bought this, it broke. I hate it!",
    "the dog sat on a mat and ran to the park",
    "she was happy and they played all day",
] * 4
HF_VOCAB_SIZE = 96
_GPT2_SMALL = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)


def save_tokenizer(
    folder: Path, corpus: list[str] = HF_CORPUS, vocab_size: int = HF_VOCAB_SIZE
) -> None:
    """A byte-level BPE tokenizer trained on ``corpus``, BOS ``<s>`` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)


def _vocab_size(folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder))


def save_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A random tiny GPT-2 language model with its tokenizer in ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = transformers.GPT2Config(vocab_size=_vocab_size(folder), **_GPT2_SMALL)
    torch.manual_seed(seed)
    model = randomise_(transformers.GPT2LMHeadModel(config), seed, 0.2, "score").eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def save_classifier(folder: Path, num_labels: int, seed: int = 0) -> Path:
    """A random tiny GPT-2 sequence classifier (``num_labels`` outputs) in ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = transformers.GPT2Config(
        vocab_size=_vocab_size(folder), num_labels=num_labels, pad_token_id=0, **_GPT2_SMALL
    )
    torch.manual_seed(seed)
    model = randomise_(transformers.GPT2ForSequenceClassification(config), seed, 0.2, "score")
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def torch_probabilities(folder: Path, texts: list[str]):
    """Class probabilities of each text, one unpadded forward pass per text (the reference):
    softmax of C > 1 logits, ``(1 − σ(s), σ(s))`` for a single score s."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    rows = []
    with torch.no_grad():
        for text in texts:
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0].double()
            if logits.shape[0] == 1:
                p = torch.sigmoid(logits[0])
                rows.append([1.0 - float(p), float(p)])
            else:
                rows.append(torch.softmax(logits, dim=-1).tolist())
    return np.asarray(rows)


def torch_scores(folder: Path, texts: list[str]):
    """The single raw output s of a 1-label classifier for each text (unpadded)."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return np.asarray(
            [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]
        )
