"""GGUF round trips of the new families: write a tiny model as llama.cpp does, load, compare.

llama.cpp's converter stores Qwen2/Qwen3 q/k rows as they are in Hugging Face (NEOX-style,
half-split RoPE: no permutation, unlike ``llama``), Qwen3's per-head norms as
``attn_q_norm`` / ``attn_k_norm``, and omits ``output.weight`` when the output is tied. A
Llama 3.1 file has its q/k rows permuted and its llama3 RoPE scaling stored as
per-frequency divisors in ``rope_freqs.weight``. A Phi-3 file keeps the fused ``attn_qkv``
and ``ffn_up`` (= ``gate_up_proj``), its rotary width in ``rope.dimension_count`` and
LongRoPE as ``rope_factors_short`` / ``_long`` tensors with ``rope.scaling.*`` metadata.
Measured max |logit difference| against the PyTorch model: qwen2 5.5e-06, qwen3 7.2e-06,
llama3 (rope_freqs) 3.8e-06, phi3 (LongRoPE, partial rotary, window 5) 6.0e-06 (bound 1e-4,
float32 round-off as in ``test_parity.py``).
"""

from __future__ import annotations

import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from tests.fixtures import randomise_
from tests.lm.test_gguf import llama_cpp_permute

FLOAT32_PARITY = 1e-4
VOCAB = 97
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3, as gguf's tensor_mapping.py maps them
    "mlp.gate_up_proj": "ffn_up",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, *part, kind = hf_name.split(".")
    return f"blk.{layer}.{BLOCK_NAMES['.'.join(part)]}.{kind}"


def torch_model(architecture: str):
    import torch
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rope_theta=1000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if architecture == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    elif architecture == "phi3":  # Phi-3.5 / Phi-4-mini: LongRoPE, half-rotary heads, window
        common = dict(common, max_position_embeddings=64)
        del common["rope_theta"]
        config = transformers.Phi3Config(
            **common,
            pad_token_id=0,
            tie_word_embeddings=True,
            sliding_window=5,
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5],
                "long_factor": [2.0, 4.0],
            },
        )
    elif architecture == "llama":  # Llama 3.1's RoPE scaling, biting at head width 8
        common = dict(common, max_position_embeddings=64)
        del common["rope_theta"]
        config = transformers.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return randomise_(model, seed=1, spread=0.3).eval()


def llama3_rope_freqs(model) -> np.ndarray:
    """The divisors ``convert_hf_to_gguf.py`` writes as ``rope_freqs.weight`` for llama3."""
    rope = model.config.rope_parameters
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    divisors = []
    for k in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (k / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, np.float32)


def write_gguf(path, architecture: str, model) -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = config.rope_parameters
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if architecture == "llama":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(model))
    if architecture == "phi3":  # as convert_hf_to_gguf.py's Phi3MiniModel writes LongRoPE
        original = rope["original_max_position_embeddings"]
        scale = config.max_position_embeddings / original
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        for kind in ("short", "long"):
            factors = np.asarray(rope[f"{kind}_factor"], np.float32)
            writer.add_tensor(f"rope_factors_{kind}.weight", factors)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.numpy()
        if architecture == "llama" and hf_name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif architecture == "llama" and hf_name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, config.num_key_value_heads)
        writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "llama", "phi3"])
def test_gguf_round_trip_matches_torch(tmp_path, architecture):
    import torch

    model = torch_model(architecture)
    path = tmp_path / f"{architecture}.gguf"
    write_gguf(path, architecture, model)
    lm = lmppl.load(str(path))
    config = lm.config
    assert config.qk_norm == (architecture == "qwen3")
    assert config.attention_bias == (architecture == "qwen2")
    assert config.tie_word_embeddings == (architecture in ("qwen3", "phi3"))
    assert (config.rope_scaling is not None) == (architecture in ("llama", "phi3"))
    assert config.fused_projections == (architecture == "phi3")
    if architecture == "phi3":  # half-rotary heads, window 5 < 9 tokens, context capped
        assert (config.partial_rotary_factor, config.context_length) == (0.5, 16)
        assert config.attention_layers == ("local", "local") and config.window_size == 5
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 9)).astype(np.int32)
    output = jax.jit(lm.apply)(lm.params, jnp.asarray(tokens), lm.init_cache(2, 16))
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    difference = np.abs(np.asarray(output.logits) - reference).max()
    print(f"{architecture} GGUF: max |logit difference| {difference:.1e}")
    assert difference <= FLOAT32_PARITY, f"{architecture} GGUF: {difference:.2e}"
