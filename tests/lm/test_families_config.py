"""Reading the 2026 families' configs, their RoPE frequencies, refusals and random twins.

No PyTorch model runs here (see ``test_families_parity.py``): configs shaped like the
published ``config.json`` files are read, the RoPE inverse frequencies at full size are
compared with ``transformers``' own ``ROPE_INIT_FUNCTIONS``, unsupported features must fail
in one line naming them, and the random tiny families of :func:`lmppl.random_lm` must
decode through the cache exactly as a full forward pass computes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl.lm.build import config_from_hf
from lmppl.lm.random_init import FAMILIES, random_lm
from lmppl.lm.rope import rope_frequencies

# Published configs, trimmed to the fields that matter (values as on the Hugging Face hub).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
PHI_3_5_MINI = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0 + 0.05 * k for k in range(48)],
        "long_factor": [1.0 + 0.5 * k for k in range(48)],
    },
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
}
GEMMA_3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
}

# The multimodal gemma-3-4b-it: text_config gives only what differs from Gemma3TextConfig.
GEMMA_3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {"model_type": "siglip_vision_model", "image_size": 896, "patch_size": 14},
    "mm_tokens_per_image": 256,
    "eos_token_id": [1, 106],
}


def test_llama_3_2_config_reads_its_rope_scaling():
    config = config_from_hf(LLAMA_3_2_1B)
    scaling = config.rope_scaling
    assert (config.architecture, config.context_length, config.rope_theta) == (
        "llama",
        131072,
        500000.0,
    )
    assert (scaling.kind, scaling.factor, scaling.original_context_length) == ("llama3", 32, 8192)
    assert (scaling.low_freq_factor, scaling.high_freq_factor) == (1.0, 4.0)
    assert config.tie_word_embeddings and config.head_dim == 64


def test_phi_3_5_longrope_caps_the_context_at_the_original_length():
    config = config_from_hf(PHI_3_5_MINI)
    assert config.fused_projections and config.rope_scaling.kind == "longrope"
    assert config.context_length == 4096  # past it transformers switches to long_factor
    assert config.rope_scaling.factor == 32.0  # 131072 / 4096
    _, attention_factor = rope_frequencies(96, 10000.0, config.rope_scaling)
    assert attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert config.attention_layers == ("local",) * 32 and config.window_size == 262144
    su = dict(PHI_3_5_MINI, rope_scaling=dict(PHI_3_5_MINI["rope_scaling"], type="su"))
    assert config_from_hf(su) == config


def test_gemma_3_legacy_and_nested_rope_fields_agree():
    transformers = pytest.importorskip("transformers")
    legacy = config_from_hf(GEMMA_3_1B)
    assert legacy.attention_layers == (("local",) * 5 + ("global",)) * 4 + ("local",) * 2
    assert (legacy.rope_theta, legacy.local_rope_theta, legacy.window_size) == (1e6, 1e4, 512)
    assert legacy.qk_norm and legacy.feedforward_norms and legacy.norm_weight_offset == 1.0
    assert legacy.embedding_multiplier == pytest.approx(math.sqrt(1152))
    assert legacy.attention_softcap is None and legacy.final_logit_softcap is None
    fields = {k: v for k, v in GEMMA_3_1B.items() if k not in ("architectures", "model_type")}
    nested = transformers.Gemma3TextConfig(**fields).to_dict()
    assert "full_attention" in nested["rope_parameters"]
    assert config_from_hf(nested) == legacy


def test_multimodal_gemma_3_reads_its_language_model_with_text_defaults():
    transformers = pytest.importorskip("transformers")
    config = config_from_hf(GEMMA_3_4B)
    assert (config.architecture, config.vocab_size, config.num_layers) == ("gemma", 262208, 34)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 256)
    assert config.attention_layers == (("local",) * 5 + ("global",)) * 5 + ("local",) * 4
    assert (config.rope_theta, config.rope_scaling.kind, config.rope_scaling.factor) == (
        1e6,
        "linear",
        8.0,
    )
    assert (config.local_rope_theta, config.local_rope_scaling) == (1e4, None)
    assert config.window_size == 1024 and config.tie_word_embeddings and config.eos_token_id == 1
    fields = {k: v for k, v in GEMMA_3_4B.items() if k not in ("architectures", "model_type")}
    assert config_from_hf(transformers.Gemma3Config(**fields).to_dict()) == config


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5},
        {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "truncate": False},
    ],
    ids=["llama3", "linear", "dynamic", "yarn", "yarn-mscale", "yarn-untruncated"],
)
def test_rope_frequencies_match_transformers_at_full_size(rope):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference_config = transformers.LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters=dict(rope, rope_theta=500000.0),
    )
    expected, expected_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](reference_config)
    config = config_from_hf(reference_config.to_dict())
    frequencies, factor = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    np.testing.assert_allclose(frequencies, expected.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_longrope_frequencies_match_transformers_with_partial_rotary():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference_config = transformers.Phi3Config(
        hidden_size=3072,
        num_attention_heads=24,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * k for k in range(48)],
            "long_factor": [2.0 + 0.1 * k for k in range(48)],
        },
    )
    expected, expected_factor = ROPE_INIT_FUNCTIONS["longrope"](reference_config)
    config = config_from_hf(reference_config.to_dict())
    assert (config.partial_rotary_factor, config.context_length) == (0.75, 4096)
    frequencies, factor = rope_frequencies(
        config.head_dim, config.rope_theta, config.rope_scaling, config.partial_rotary_factor
    )
    np.testing.assert_allclose(frequencies, expected.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_qwen3_sliding_layers_start_at_max_window_layers():
    qwen3 = {
        "model_type": "qwen3",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
    }
    assert config_from_hf(qwen3).attention_layers == ()
    sliding = dict(qwen3, use_sliding_window=True, sliding_window=128, max_window_layers=2)
    config = config_from_hf(sliding)
    assert config.attention_layers == ("global", "global", "local", "local")
    assert (config.window_size, config.head_dim, config.qk_norm) == (128, 32, True)
    untyped = {k: v for k, v in qwen3.items() if k != "model_type"}
    assert config_from_hf(dict(untyped, architectures=["Qwen3ForCausalLM"])) == config_from_hf(
        qwen3
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rope_scaling": {"rope_type": "proportional", "factor": 2.0}},
            r"^llama: RoPE scaling 'proportional' is not supported; supported: linear, dynamic, "
            r"yarn, llama3, longrope$",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"^llama: RoPE scaling 'llama3' needs 'low_freq_factor' in rope_scaling$",
        ),
        ({"model_type": "gemma3n"}, r"^unsupported model type 'gemma3n' \(Gemma 3n is not"),
        ({"model_type": "phi"}, r"^unsupported model type 'phi' \(Phi-1/Phi-2 .*; supported: "),
        ({"model_type": "qwen3", "attention_bias": True}, r"^qwen3: attention_bias"),
        (
            {"architectures": ["Qwen3ForSequenceClassification"], "model_type": "qwen3"},
            r"^Qwen3ForSequenceClassification is a classifier, not a language model",
        ),
        (
            {"model_type": "gemma2", "use_bidirectional_attention": True},
            r"^gemma2: use_bidirectional_attention is not supported$",
        ),
        (
            {"model_type": "gemma2", "layer_types": ["chunked_attention"] * 16},
            r"^gemma2: attention layer type 'chunked_attention' is not supported; supported: "
            r"full_attention, sliding_attention$",
        ),
    ],
)
def test_unsupported_features_are_one_line_errors_naming_them(changes, message):
    base = {k: v for k, v in LLAMA_3_2_1B.items() if k != "rope_scaling"}
    with pytest.raises(ValueError, match=message) as error:
        config_from_hf(dict(base, **changes))
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module", params=FAMILIES)
def family_lm(request):
    return random_lm(request.param, symbols=5, hidden_size=16, num_layers=2, seed=7)


def test_random_families_decode_through_the_cache_as_a_full_forward_pass(family_lm):
    """Six tokens: window 2 (gemma) is exceeded, and the cache must reproduce every logit."""
    lm = family_lm
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, lm.vocab_size, (2, 6)), jnp.int32)
    apply = jax.jit(lm.apply)
    full = apply(lm.params, tokens, lm.init_cache(2, 8)).logits
    cache, stepped = lm.init_cache(2, 8), []
    for position in range(6):
        output = apply(lm.params, tokens[:, position : position + 1], cache)
        stepped.append(output.logits)
        cache = output.cache
    np.testing.assert_allclose(np.concatenate(stepped, axis=1), full, atol=1e-5, rtol=0)
    assert np.all(np.isfinite(np.asarray(full)))


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_bfloat16_families_keep_float32_logits_without_silent_promotion(family):
    lm16 = random_lm(family, symbols=5, seed=7).astype(jnp.bfloat16)
    tokens = jnp.asarray([[1, 3, 4, 5, 2]], jnp.int32)
    with jax.numpy_dtype_promotion("strict"):
        output = jax.jit(lm16.apply)(lm16.params, tokens, lm16.init_cache(1, 8))
    assert output.logits.dtype == jnp.float32 and output.cache.keys[0].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(output.logits)))


def test_random_family_configs_switch_the_family_features():
    qwen3, phi3 = random_lm("qwen3").config, random_lm("phi3").config
    gemma2, gemma3 = random_lm("gemma2").config, random_lm("gemma3").config
    assert qwen3.architecture == phi3.architecture == "llama"
    assert qwen3.qk_norm and phi3.fused_projections and phi3.partial_rotary_factor == 0.5
    assert gemma2.architecture == gemma3.architecture == "gemma"
    assert gemma2.attention_softcap and gemma2.final_logit_softcap and not gemma2.qk_norm
    assert gemma3.qk_norm and gemma3.local_rope_theta == 10_000.0
    assert gemma2.attention_layers == gemma3.attention_layers == ("local", "global")
    with pytest.raises(ValueError, match="unknown architecture 'mamba'; choose one of"):
        random_lm("mamba")
