"""The 2026 decoder families and RoPE scalings through ``lmppl.load``, against PyTorch.

Each case is a tiny random ``transformers`` model (float32, eager attention) saved with
``save_pretrained`` (safetensors) and loaded back with :func:`lmppl.load`; its logits are
compared with the PyTorch model's three ways: a full forward pass, prefill then one token
at a time through the KV cache, and a right-padded batch of prompts of lengths 3, 11 and 6
followed by one decode step per row. Sliding windows (Gemma 2/3, Phi-3) are narrower than
the sequences, and Gemma 2's soft-capping constants are small enough to bend the scores.

The bound 1e-4 is float32 round-off over two layers of width 32-48 (as in
``test_parity.py``). Measured max |logit difference| (CPU, float32; ``-s`` prints them):

=====================  ========  ========  ========
case                   forward   decode    padded
=====================  ========  ========  ========
llama3 (Llama 3.1)     5.0e-06   1.2e-05   5.5e-06
llama linear           9.9e-06   5.2e-06   4.1e-06
llama dynamic          7.4e-06   5.2e-06   9.9e-06
llama yarn             8.8e-06   6.9e-06   7.5e-06
qwen3                  6.2e-06   6.2e-06   3.7e-06
qwen3 yarn (mscale)    6.4e-06   4.6e-06   5.0e-06
gemma (1)              2.2e-05   1.8e-05   3.6e-05
gemma2                 7.8e-06   1.3e-05   1.0e-05
gemma3 text            1.1e-05   1.0e-05   1.4e-05
gemma3 multimodal      2.8e-05   1.0e-05   9.1e-06
phi3 (window 5)        3.6e-06   5.2e-06   4.6e-06
phi3 longrope partial  6.7e-06   7.0e-06   5.7e-06
=====================  ========  ========  ========

(Threaded float32 reductions make the last digit vary between runs.) Every feature these
cases switch on moves the logits by more than 1 when it is dropped (checked by hand:
RoPE scaling, yarn/longrope attention factors, q/k norms, windows, soft-capping, Gemma's
norms, embedding scale and local RoPE base), so the bound cannot be met by accident.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl.lm.base import LanguageModel
from tests.fixtures import randomise_

FLOAT32_PARITY = 1e-4
VOCAB = 97
SEQUENCE_LENGTH = 11
CACHE_LENGTH = 16
PROMPT_LENGTHS = np.array([3, 11, 6], np.int32)
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_config(case: str):
    """The ``transformers`` config of one case."""
    import transformers

    llama = dict(_SMALL, tie_word_embeddings=False)
    gemma = dict(_SMALL, head_dim=16, pad_token_id=0, hidden_activation="gelu_pytorch_tanh")
    configs = {
        "llama3": lambda: transformers.LlamaConfig(
            **llama,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "llama_linear": lambda: transformers.LlamaConfig(
            **llama, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
        ),
        "llama_dynamic": lambda: transformers.LlamaConfig(
            **llama, rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}
        ),
        "llama_yarn": lambda: transformers.LlamaConfig(
            **dict(llama, max_position_embeddings=64),
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 100.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "qwen3": lambda: transformers.Qwen3Config(**dict(_SMALL, head_dim=16)),
        "qwen3_yarn": lambda: transformers.Qwen3Config(
            **dict(_SMALL, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True),
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 200.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 2.0,
                "mscale_all_dim": 1.0,
            },
        ),
        "gemma": lambda: transformers.GemmaConfig(
            **{k: v for k, v in gemma.items() if k != "hidden_activation"}
        ),
        "gemma2": lambda: transformers.Gemma2Config(
            **gemma,
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(
            **dict(gemma, num_hidden_layers=3),
            query_pre_attn_scalar=24,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            },
        ),
        "gemma3_multimodal": lambda: transformers.Gemma3Config(
            text_config=dict(
                gemma,
                query_pre_attn_scalar=24,
                sliding_window=3,
                layer_types=["sliding_attention", "full_attention"],
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            boi_token_index=VOCAB + 1,
            eoi_token_index=VOCAB + 2,
            image_token_index=VOCAB + 3,
        ),
        "phi3": lambda: transformers.Phi3Config(
            **_SMALL, sliding_window=5, pad_token_id=0, tie_word_embeddings=False
        ),
        "phi3_longrope": lambda: transformers.Phi3Config(
            **dict(_SMALL, max_position_embeddings=64, tie_word_embeddings=True),
            pad_token_id=0,
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5],
                "long_factor": [2.0, 4.0],
            },
        ),
    }
    return configs[case]()


CASES = [
    "llama3",
    "llama_linear",
    "llama_dynamic",
    "llama_yarn",
    "qwen3",
    "qwen3_yarn",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3_multimodal",
    "phi3",
    "phi3_longrope",
]


@dataclasses.dataclass
class Loaded:
    """A PyTorch model, what ``save_pretrained`` wrote, and the model ``lmppl.load`` read."""

    case: str
    torch_model: object
    config_json: dict
    lm: LanguageModel
    apply: object  # lm.apply, jitted once per case (shared by the tests of the case)
    differences: dict

    def torch_logits(self, tokens) -> np.ndarray:
        import torch

        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
            return self.torch_model(input_ids=ids).logits.float().numpy()

    def record(self, check: str, difference: float) -> None:
        self.differences[check] = difference
        print(f"{self.case} {check}: max |logit difference| {difference:.1e}")
        assert difference <= FLOAT32_PARITY, f"{self.case} {check}: {difference:.2e}"


@pytest.fixture(scope="module", params=CASES)
def loaded(request, tmp_path_factory) -> Loaded:
    import torch
    import transformers

    case = request.param
    config = hf_config(case)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    if case == "gemma3_multimodal":  # lmppl reads its language model
        model = transformers.Gemma3ForConditionalGeneration(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = randomise_(model, seed=0, spread=0.3).eval()
    folder = tmp_path_factory.mktemp(case)
    model.save_pretrained(folder, safe_serialization=True)
    lm = lmppl.load(str(folder))
    config_json = json.loads((folder / "config.json").read_text())
    return Loaded(case, model, config_json, lm, jax.jit(lm.apply), {})


def tokens(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def counts(*values: int) -> jax.Array:
    """Per-row token counts, int32 and not weakly typed, so every call shares one trace."""
    return jnp.asarray(np.array(values, np.int32))


def test_full_forward_matches_torch(loaded):
    lm = loaded.lm
    batch = tokens(1, (3, SEQUENCE_LENGTH))
    output = loaded.apply(
        lm.params,
        jnp.asarray(batch),
        lm.init_cache(3, CACHE_LENGTH),
        counts(*[SEQUENCE_LENGTH] * 3),
    )
    assert output.logits.shape == (3, SEQUENCE_LENGTH, VOCAB)
    difference = np.abs(np.asarray(output.logits) - loaded.torch_logits(batch)).max()
    loaded.record("forward", difference)


def test_cached_decoding_matches_torch(loaded):
    lm = loaded.lm
    batch = tokens(2, (3, SEQUENCE_LENGTH))
    reference = loaded.torch_logits(batch)
    prompt = 4
    output = loaded.apply(
        lm.params, jnp.asarray(batch[:, :prompt]), lm.init_cache(3, CACHE_LENGTH), counts(4, 4, 4)
    )
    logits, cache = [np.asarray(output.logits)], output.cache
    for position in range(prompt, SEQUENCE_LENGTH):
        step = jnp.asarray(batch[:, position : position + 1])
        output = loaded.apply(lm.params, step, cache, counts(1, 1, 1))
        logits.append(np.asarray(output.logits))
        cache = output.cache
    np.testing.assert_array_equal(cache.length, [SEQUENCE_LENGTH] * 3)
    difference = np.abs(np.concatenate(logits, axis=1) - reference).max()
    loaded.record("decode", difference)


def test_right_padded_prompts_match_unpadded_rows(loaded):
    """Rows of lengths 3, 11, 6 padded to 11, then one decode step at three positions."""
    lm = loaded.lm
    full = tokens(3, (3, SEQUENCE_LENGTH + 1))
    padded = full[:, :SEQUENCE_LENGTH].copy()
    for row, length in enumerate(PROMPT_LENGTHS):
        padded[row, length:] = 0
    cache = lm.init_cache(3, CACHE_LENGTH)
    output = loaded.apply(lm.params, jnp.asarray(padded), cache, counts(*PROMPT_LENGTHS))
    np.testing.assert_array_equal(output.cache.length, PROMPT_LENGTHS)
    next_tokens = full[np.arange(3), PROMPT_LENGTHS][:, None]
    stepped = loaded.apply(lm.params, jnp.asarray(next_tokens), output.cache, counts(1, 1, 1))
    worst = 0.0
    for row, length in enumerate(PROMPT_LENGTHS):
        reference = loaded.torch_logits(full[row : row + 1, : length + 1])[0]
        prefill = np.abs(np.asarray(output.logits[row, :length]) - reference[:length]).max()
        step = np.abs(np.asarray(stepped.logits[row, 0]) - reference[length]).max()
        worst = max(worst, prefill, step)
    loaded.record("padded", worst)
