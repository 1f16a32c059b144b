"""Loading Hugging Face folders, and the one-line errors of the loaders."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl.lm.base import Tokenizer as TokenizerProtocol
from lmppl.lm.build import build_network, config_from_hf
from lmppl.lm.hf import HFTokenizer, load_hf
from tests.fixtures import save_tokenizer

FLOAT32_PARITY = 1e-4  # float32 round-off over a few layers of width 32 (see test_parity.py)
CORPUS = ["once upon a time there was a cat", "the cat sat on a mat", "a dog ran"] * 5


def save_tiny_tokenizer(folder) -> None:
    """A byte-level BPE tokenizer (vocabulary 48) trained on :data:`CORPUS`."""
    save_tokenizer(folder, CORPUS, vocab_size=48)


@pytest.mark.parametrize(("case", "shard_size"), [("llama_gqa_untied", "20KB"), ("gpt_neo", None)])
def test_load_hf_round_trip(get_twin, tmp_path, case, shard_size):
    twin = get_twin(case)
    options = {} if shard_size is None else {"max_shard_size": shard_size}
    twin.torch_model.save_pretrained(tmp_path, safe_serialization=True, **options)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_size is not None)
    save_tiny_tokenizer(tmp_path)

    lm = load_hf(str(tmp_path))
    tokens = lm.tokenizer.encode("once upon a time there was a dog")
    assert tokens[0] == lm.tokenizer.bos_token_id == 1
    batch = np.asarray([tokens], np.int32)
    output = jax.jit(lm.apply)(lm.params, jnp.asarray(batch), lm.init_cache(1, 16))
    difference = np.abs(np.asarray(output.logits) - twin.torch_logits(batch)).max()
    assert difference <= FLOAT32_PARITY, f"{case}: max |logit difference| {difference:.2e}"
    assert lm.config == twin.lm.config
    assert lm.dtype == jnp.float32
    assert load_hf(str(tmp_path), dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_hf_tokenizer_implements_the_protocol(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tokenizer = HFTokenizer.from_folder(tmp_path)
    assert isinstance(tokenizer, TokenizerProtocol)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    text = "the cat sat on a mat"
    with_bos = tokenizer.encode(text)
    bare = tokenizer.encode(text, add_bos=False)
    assert with_bos == [1, *bare]
    assert all(isinstance(i, int) for i in with_bos)
    assert tokenizer.decode(with_bos) == text
    assert tokenizer.decode(np.asarray(with_bos)) == text
    assert tokenizer.decode(with_bos, skip_special_tokens=False).startswith("<s>")
    assert tokenizer.vocab_size == 48


def test_missing_tensor_is_named(get_twin):
    twin = get_twin("llama_gqa_untied")
    tensors = dict(twin.tensors)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'.*missing"):
        build_network(twin.lm.config, tensors)


def test_untied_output_without_lm_head_is_named(get_twin):
    twin = get_twin("gpt2")
    untied = twin.lm.config.replace(tie_word_embeddings=False)
    tensors = {k: v for k, v in twin.tensors.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="'lm_head.weight'"):
        build_network(untied, tensors)
    build_network(twin.lm.config, tensors)  # tied: the embedding is the output


def test_wrong_shape_is_named(get_twin):
    twin = get_twin("gpt2")
    tensors = dict(twin.tensors)
    tensors["transformer.h.0.attn.c_attn.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError) as error:
        build_network(twin.lm.config, tensors)
    message = str(error.value)
    assert "'transformer.h.0.attn.c_attn.weight'" in message
    assert "(32, 32)" in message and "(32, 96)" in message
    assert "\n" not in message


def test_base_model_checkpoints_without_wrapper_prefix_load(get_twin):
    twin = get_twin("gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in twin.tensors.items()}
    network = build_network(twin.lm.config, bare)
    assert jax.tree.all(jax.tree.map(np.array_equal, network_params(network), twin.lm.params))


def network_params(network):
    from flax import nnx

    return nnx.split(network)[1]


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"^unsupported model type 'bert'; supported: llama, "):
        config_from_hf({"model_type": "bert"})


def test_unsupported_features_are_refused(get_twin):
    llama = dict(get_twin("llama").hf_config)
    scaled = dict(llama, rope_parameters={"rope_type": "proportional", "rope_theta": 5e5})
    message = r"^llama: RoPE scaling 'proportional' is not supported; supported: linear, dynamic"
    with pytest.raises(ValueError, match=message):
        config_from_hf(scaled)
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf(dict(llama, attention_bias=True))


def test_config_from_hf_reads_legacy_fields():
    legacy = {
        "model_type": "mistral",
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
    }
    config = config_from_hf(legacy)
    assert (config.head_dim, config.rope_theta, config.context_length) == (8, 1e6, 4096)
    assert not config.tie_word_embeddings and not config.attention_bias


@pytest.mark.parametrize("missing", ["/no/such/folder", "./no-such-folder", "nobody/no-such-model"])
def test_missing_folder_or_hub_id_is_one_line(missing):
    with pytest.raises(FileNotFoundError) as error:
        load_hf(missing)
    message = str(error.value)
    assert "\n" not in message and missing in message
    assert error.value.__cause__ is None


def test_folder_without_safetensors_is_one_line(tmp_path, get_twin):
    (tmp_path / "config.json").write_text(json.dumps(get_twin("gpt2").hf_config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_hf(str(tmp_path))
