"""The llama2.c reader on stories260K: config, tensors, RoPE permutation, and errors.

The checkpoint is read a second time here, directly from the format description in
``shared/assets/stories260K/PROVENANCE.md``, and run through a NumPy forward pass that
rotates *interleaved* pairs on the original weights. Three implementations must then agree
in float32 (max |logit difference| <= 1e-4, float32 round-off over 5 layers of width 64;
observed ~1e-5 against the float64 reference): that reference, ``transformers``' ``LlamaForCausalLM`` loaded with the
reader's half-split tensors, and lmppl's network from ``load("stories260k")``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmppl.lm.llama2c import interleaved_to_half_split, read_llama2c
from lmppl.lm.registry import load

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K"
CHECKPOINT = Path(os.environ.get("LMPPL_STORIES260K", ASSETS)) / "stories260K.bin"
HEADER = (64, 172, 5, 8, 4, 512, 512)  # dim, hidden, layers, heads, kv heads, vocab, seq_len
FLOAT32_PARITY = 1e-4
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside."

pytestmark = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"no {CHECKPOINT}")


def read_raw_arrays(path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's arrays exactly as stored (interleaved RoPE), from the format spec."""
    header = np.fromfile(path, dtype="<i4", count=7)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = (int(v) for v in header)
    head_size = dim // heads
    flat = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    shapes = {
        "token_embedding": (abs(vocab), dim),
        "rms_att": (layers, dim),
        "wq": (layers, heads * head_size, dim),
        "wk": (layers, kv_heads * head_size, dim),
        "wv": (layers, kv_heads * head_size, dim),
        "wo": (layers, dim, heads * head_size),
        "rms_ffn": (layers, dim),
        "w1": (layers, hidden, dim),
        "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim),
        "rms_final": (dim,),
    }
    arrays, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        arrays[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    offset += seq_len * head_size  # the two legacy RoPE tables
    assert flat.size == offset, "stories260K is tied: nothing follows the RoPE tables"
    return arrays


def reference_logits(arrays: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """``[T, V]`` logits of llama2.c's forward pass (float64, interleaved RoPE)."""
    dim, _, layers, heads, kv_heads, _, _ = HEADER
    head_size, steps = dim // heads, len(tokens)
    frequencies = 10000.0 ** (-np.arange(0, head_size, 2) / head_size)  # [D/2]
    angles = np.arange(steps)[:, None, None] * frequencies  # [T, 1, D/2]
    cos, sin = np.cos(angles), np.sin(angles)

    def rotate_pairs(x):  # [T, heads, D]: pairs (2i, 2i+1) rotate together
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = np.empty_like(x)
        rotated[..., 0::2] = even * cos - odd * sin
        rotated[..., 1::2] = even * sin + odd * cos
        return rotated

    def rms_norm(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weight

    future = np.triu(np.ones((steps, steps), bool), k=1)
    x = arrays["token_embedding"][tokens]
    for layer in range(layers):
        h = rms_norm(x, arrays["rms_att"][layer])
        q = rotate_pairs((h @ arrays["wq"][layer].T).reshape(steps, heads, head_size))
        k = rotate_pairs((h @ arrays["wk"][layer].T).reshape(steps, kv_heads, head_size))
        v = (h @ arrays["wv"][layer].T).reshape(steps, kv_heads, head_size)
        k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(head_size)
        scores[:, future] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("hts,shd->thd", weights, v).reshape(steps, dim)
        x = x + attended @ arrays["wo"][layer].T
        h = rms_norm(x, arrays["rms_ffn"][layer])
        gate = h @ arrays["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ arrays["w3"][layer].T)) @ arrays["w2"][layer].T
    return rms_norm(x, arrays["rms_final"]) @ arrays["token_embedding"].T


def torch_logits(config, tensors: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """``[T, V]`` logits of ``transformers``' ``LlamaForCausalLM`` (half-split RoPE)."""
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {name: torch.from_numpy(np.array(value)) for name, value in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.fixture(scope="module")
def stories():
    return read_llama2c(CHECKPOINT)


@pytest.fixture(scope="module")
def story_tokens():
    return load("stories260k").tokenizer.encode(STORY)


def test_config_follows_the_header(stories):
    config, tensors = stories
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (
        dim,
        hidden,
        layers,
    )
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (heads, kv_heads, 8)
    assert (config.vocab_size, config.context_length) == (vocab, seq_len)
    assert config.architecture == "llama" and config.tie_word_embeddings
    assert (config.rope_theta, config.norm_eps) == (10000.0, 1e-5)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    per_layer = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    expected = {f"model.layers.{i}.{part}.weight" for i in range(layers) for part in per_layer}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    assert set(tensors) == expected
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (kv_heads * 8, dim)
    assert tensors["model.layers.4.mlp.down_proj.weight"].shape == (dim, hidden)
    assert all(t.dtype == np.float32 for t in tensors.values())


def test_interleaved_to_half_split_moves_pair_components_to_halves():
    # Two heads of width 4: rows (pair 0: 0, 1), (pair 1: 2, 3) become (0, 2 | 1, 3).
    weight = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    permuted = interleaved_to_half_split(weight, num_heads=2)
    np.testing.assert_array_equal(permuted[:, 0], [0, 2, 1, 3, 4, 6, 5, 7])
    with pytest.raises(ValueError, match="heads of even width"):
        interleaved_to_half_split(np.zeros((6, 2)), num_heads=2)


def test_torch_on_permuted_tensors_matches_interleaved_reference(stories, story_tokens):
    config, tensors = stories
    reference = reference_logits(read_raw_arrays(CHECKPOINT), story_tokens)
    difference = np.abs(torch_logits(config, tensors, story_tokens) - reference).max()
    assert difference <= FLOAT32_PARITY, f"max |logit difference| {difference:.2e}"


def test_unpermuted_tensors_do_not_match_the_reference(stories, story_tokens):
    """The comparison above is sensitive to the permutation: skipping it breaks parity."""
    config, tensors = stories
    raw = read_raw_arrays(CHECKPOINT)
    unpermuted = dict(tensors)
    for layer in range(config.num_layers):
        for part, name in (("q_proj", "wq"), ("k_proj", "wk")):
            key = f"model.layers.{layer}.self_attn.{part}.weight"
            unpermuted[key] = raw[name][layer].astype(np.float32)
    reference = reference_logits(raw, story_tokens)
    assert np.abs(torch_logits(config, unpermuted, story_tokens) - reference).max() > 0.1


@pytest.mark.slow
def test_lmppl_network_matches_torch_and_reference(stories, story_tokens):
    config, tensors = stories
    lm = load("stories260k")
    tokens = jnp.asarray([story_tokens])
    logits = np.asarray(lm.apply(lm.params, tokens, lm.init_cache(1, len(story_tokens))).logits[0])
    torch_difference = np.abs(logits - torch_logits(config, tensors, story_tokens)).max()
    assert torch_difference <= FLOAT32_PARITY, f"lmppl vs torch: {torch_difference:.2e}"
    reference = reference_logits(read_raw_arrays(CHECKPOINT), story_tokens)
    reference_difference = np.abs(logits - reference).max()
    assert reference_difference <= FLOAT32_PARITY, f"lmppl vs reference: {reference_difference:.2e}"


def test_stories260k_predicts_its_own_domain_well(story_tokens):
    """A TinyStories sentence costs far less than the uniform log 512 = 6.24 nats/token."""
    lm = load("stories260k")
    tokens = jnp.asarray([story_tokens])
    logits = lm.apply(lm.params, tokens, lm.init_cache(1, len(story_tokens))).logits[0]
    log_probs = np.asarray(logits - jnp.log(jnp.exp(logits).sum(-1, keepdims=True)))
    nll = -np.mean(log_probs[np.arange(len(story_tokens) - 1), story_tokens[1:]])
    assert nll < 1.5, f"mean NLL {nll:.3f} nats/token"


def write_variant(tmp_path: Path, header, extra: bytes = b"", cut: int = 0) -> Path:
    """stories260K with another header, bytes appended or its last ``cut`` bytes removed."""
    body = CHECKPOINT.read_bytes()[28:]
    body = body[: len(body) - cut] + extra
    path = tmp_path / "variant.bin"
    path.write_bytes(np.asarray(header, dtype="<i4").tobytes() + body)
    return path


def test_untied_checkpoint_reads_its_output_matrix(tmp_path, stories):
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER
    output = np.random.default_rng(0).normal(size=(vocab, dim)).astype(np.float32)
    untied = (dim, hidden, layers, heads, kv_heads, -vocab, seq_len)
    config, tensors = read_llama2c(write_variant(tmp_path, untied, extra=output.tobytes()))
    assert not config.tie_word_embeddings and config.vocab_size == vocab
    np.testing.assert_array_equal(tensors["lm_head.weight"], output)
    np.testing.assert_array_equal(
        tensors["model.embed_tokens.weight"], stories[1]["model.embed_tokens.weight"]
    )


@pytest.mark.parametrize(
    ("header", "extra", "cut", "message"),
    [
        (HEADER, b"", 100, "truncated llama2.c checkpoint"),
        (HEADER, b"\0" * 8, 0, "oversized llama2.c checkpoint"),
        ((64, 172, 5, 8, 4, -512, 512), b"", 0, r"truncated .*\(untied output\)"),
        ((64, 172, 5, 7, 4, 512, 512), b"", 0, "dim 64 is not a multiple of n_heads 7"),
        ((64, 172, 5, 8, 3, 512, 512), b"", 0, "n_heads 8 is not a multiple of n_kv_heads 3"),
        ((64, 172, 0, 8, 4, 512, 512), b"", 0, "non-positive sizes"),
    ],
)
def test_inconsistent_checkpoints_give_one_line_errors(tmp_path, header, extra, cut, message):
    with pytest.raises(ValueError, match=message) as error:
        read_llama2c(write_variant(tmp_path, header, extra=extra, cut=cut))
    assert "\n" not in str(error.value)


def test_file_shorter_than_a_header_and_missing_file(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\1\0\0\0")
    with pytest.raises(ValueError, match="no header"):
        read_llama2c(short)
    with pytest.raises(FileNotFoundError, match="no llama2.c checkpoint"):
        read_llama2c(tmp_path / "absent.bin")


def test_non_finite_weights_fail_in_one_line_naming_the_tensor(tmp_path):
    """A file of the right size with NaNs in the embedding (issue #15, item 5)."""
    body = bytearray(CHECKPOINT.read_bytes())
    body[28 : 28 + 4 * 16] = np.full(16, np.nan, np.float32).tobytes()  # embedding row 0
    path = tmp_path / "nan.bin"
    path.write_bytes(bytes(body))
    tokenizer = CHECKPOINT.parent / "tok512.bin"
    (tmp_path / tokenizer.name).write_bytes(tokenizer.read_bytes())
    with pytest.raises(ValueError, match="embed_tokens.weight' has 16 non-finite") as error:
        load(path)
    assert "\n" not in str(error.value)
