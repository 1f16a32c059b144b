"""Loading what users have: bfloat16 checkpoints kept in bfloat16, sharded safetensors, chat
templates, and one-line refusals of what is not supported.

The bfloat16 bound: bfloat16 keeps 8 significant bits, so each rounding of an activation is
off by at most u = 2^-8 of its size. The bfloat16 and float32 models below share the same
(bfloat16-representable) weights, so their logits differ only by the roundings of the
activations: about four per block on the residual path (normalised input, attention output,
MLP output, residual sums), eight for the two blocks here. The bound is therefore
8 u max|logit| (0.031 of the logit scale); measured: 0.0115 (llama) and 0.0098 (gpt2) of it,
i.e. about 3 u.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl.lm.hf import HFTokenizer
from lmppl.lm.tokenizers import load_llama2c_tokenizer, tokenizer_from_gguf_metadata
from tests.fixtures import save_tokenizer
from tests.lm.test_tokenizers import TOKENIZER_FILE, byte_level_metadata, needs_tok512

BFLOAT16_UNIT_ROUNDOFF = 2.0**-8
BFLOAT16_ROUNDINGS = 8  # about four activation roundings per block, two blocks
CORPUS = ["once upon a time there was a cat", "the cat sat on a mat", "a dog ran"] * 5
CHAT_CORPUS = [*CORPUS, "<|system|>be brief<|user|><|assistant|>"]  # every character covered
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the cat sat on a mat"},
]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def random_tokens(seed: int, shape: tuple[int, ...], vocab: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def forward(lm, tokens: jax.Array) -> np.ndarray:
    cache = lm.init_cache(tokens.shape[0], tokens.shape[1])
    return np.asarray(jax.jit(lm.apply)(lm.params, tokens, cache).logits)


# ------------------------------------------------------------------------ sharded safetensors


def test_sharded_folder_loads_exactly_as_the_single_file(get_twin, tmp_path):
    twin = get_twin("llama_gqa_untied")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    twin.torch_model.save_pretrained(single)
    twin.torch_model.save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (sharded / "model.safetensors").exists()

    one, many = lmppl.load(str(single)), lmppl.load(str(sharded))
    assert jax.tree.all(jax.tree.map(np.array_equal, one.params, many.params))
    tokens = random_tokens(0, (2, 9), one.vocab_size)
    np.testing.assert_array_equal(forward(one, tokens), forward(many, tokens))

    (sharded / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{shards[-1]}.* is missing") as error:
        lmppl.load(str(sharded))
    one_line(error)


# ----------------------------------------------------------------------------- bfloat16


_BFLOAT16_FOLDERS: dict = {}


def bfloat16_checkpoint(case: str, tmp_path_factory):
    """A twin saved as a bfloat16 checkpoint (as most hub checkpoints are), once per case;
    returns the folder and the stored tensors widened to float32."""
    if case not in _BFLOAT16_FOLDERS:
        import torch

        from tests.fixtures import make_twin

        folder = tmp_path_factory.mktemp(f"bf16_{case}")
        model = copy.deepcopy(make_twin(case).torch_model).to(torch.bfloat16)
        model.save_pretrained(folder)
        tensors = {name: t.float().numpy() for name, t in model.state_dict().items()}
        _BFLOAT16_FOLDERS[case] = (folder, tensors)
    return _BFLOAT16_FOLDERS[case]


@pytest.fixture(scope="module", params=["llama_gqa_untied", "gpt2"])
def bfloat16_folder(request, tmp_path_factory):
    return bfloat16_checkpoint(request.param, tmp_path_factory)


def test_bfloat16_checkpoint_kept_in_bfloat16_with_float32_logits(bfloat16_folder):
    folder, stored = bfloat16_folder
    lm16 = lmppl.load(str(folder), dtype=jnp.bfloat16)
    lm32 = lmppl.load(str(folder))
    assert {leaf.dtype for leaf in jax.tree.leaves(lm16.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(lm32.params)} == {jnp.dtype(jnp.float32)}
    # The stored bfloat16 values are kept as they are (and widened exactly for float32).
    network = lm16.network()
    embedding = getattr(network, "embed_tokens", None) or network.wte
    stored_name = next(n for n in stored if n.endswith(("embed_tokens.weight", "wte.weight")))
    np.testing.assert_array_equal(np.asarray(embedding.table[...], np.float32), stored[stored_name])
    widened = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), lm16.params)
    assert jax.tree.all(jax.tree.map(np.array_equal, widened, lm32.params))

    tokens = random_tokens(1, (4, 12), lm16.vocab_size)
    with jax.numpy_dtype_promotion("strict"):  # no silent bfloat16 -> float32 upcasts
        output = jax.jit(lm16.apply)(lm16.params, tokens, lm16.init_cache(4, 16))
    assert output.logits.dtype == jnp.float32
    assert output.cache.keys[0].dtype == jnp.bfloat16
    full = forward(lm32, tokens)
    difference = np.abs(np.asarray(output.logits) - full).max()
    bound = BFLOAT16_ROUNDINGS * BFLOAT16_UNIT_ROUNDOFF * np.abs(full).max()
    assert difference <= bound, f"bfloat16 vs float32: max |Δlogit| {difference:.4f} > {bound:.4f}"
    assert difference > 0  # the bfloat16 model really computes in bfloat16


def test_bfloat16_model_decodes_through_the_cache(bfloat16_folder):
    folder, _ = bfloat16_folder
    lm16 = lmppl.load(str(folder), dtype="bfloat16")
    tokens = random_tokens(2, (2, 8), lm16.vocab_size)
    apply = jax.jit(lm16.apply)
    full = np.asarray(apply(lm16.params, tokens, lm16.init_cache(2, 8)).logits)
    output = apply(lm16.params, tokens[:, :5], lm16.init_cache(2, 8))
    stepped, cache = [np.asarray(output.logits)], output.cache
    for position in range(5, 8):
        output = apply(lm16.params, tokens[:, position : position + 1], cache)
        stepped.append(np.asarray(output.logits))
        cache = output.cache
    # Same bfloat16 arithmetic in another order (one query at a time): within the same bound.
    bound = BFLOAT16_ROUNDINGS * BFLOAT16_UNIT_ROUNDOFF * np.abs(full).max()
    assert np.abs(np.concatenate(stepped, axis=1) - full).max() <= bound


def test_bfloat16_model_runs_smc(tmp_path_factory):
    folder, _ = bfloat16_checkpoint("llama_gqa_untied", tmp_path_factory)
    lm16 = lmppl.load(str(folder), dtype=jnp.bfloat16)
    prompt = [1, 5, 9]

    def program():
        story = numpyro.sample("s", lmppl.LM(lm16, prompt, 4, stop_at_eos=False))
        numpyro.factor("likes_7", 0.5 * jnp.sum(story == 7))

    result = lmppl.infer.SMC(program, num_particles=8).run(jax.random.key(0))
    samples = np.asarray(result.samples["s"])
    assert samples.shape == (8, 4) and samples.min() >= 0 and samples.max() < lm16.vocab_size
    assert np.isfinite(float(result.log_marginal))
    assert np.all(np.isfinite(np.asarray(result.log_weights)))


# ------------------------------------------------------------------------ chat templates


@pytest.fixture(scope="module")
def chat_folders(tmp_path_factory):
    """Tokenizer folders: template in tokenizer_config.json, in chat_template.jinja, none."""
    folders = {}
    for kind in ("config", "jinja", "none"):
        folder = tmp_path_factory.mktemp(f"chat_{kind}")
        save_tokenizer(folder, CHAT_CORPUS, vocab_size=60)
        if kind == "config":
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config["chat_template"] = TEMPLATE
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        elif kind == "jinja":
            (folder / "chat_template.jinja").write_text(TEMPLATE)
        folders[kind] = folder
    return folders


@pytest.mark.parametrize("kind", ["config", "jinja"])
def test_chat_template_renders_as_transformers_does(chat_folders, kind):
    from transformers import AutoTokenizer

    tokenizer = HFTokenizer.from_folder(chat_folders[kind])
    reference = AutoTokenizer.from_pretrained(str(chat_folders[kind]))
    assert tokenizer.chat_template == TEMPLATE
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    expected = "<s><|system|>be brief</s><|user|>the cat sat on a mat</s><|assistant|>"
    assert text == expected
    assert text == reference.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    without = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert without == expected.removesuffix("<|assistant|>")
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    # The template writes the BOS; nothing is added on top of it.
    assert ids == tokenizer.encode(text, add_bos=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_prompt_feeds_the_model(chat_folders, get_twin, tmp_path):
    twin = get_twin("gpt2")
    folder = tmp_path / "model"
    twin.torch_model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((chat_folders["config"] / name).read_bytes())
    lm = lmppl.load(str(folder))
    messages = [{"role": "user", "content": "a cat"}]  # the model's context is 32
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    distribution = lmppl.LM(lm, prompt=ids, max_new_tokens=3, stop_at_eos=False)
    np.testing.assert_array_equal(distribution.prompt_tokens, ids)  # used exactly as given
    samples = np.asarray(distribution.sample(jax.random.key(0)))
    assert samples.shape == (3,) and samples.min() >= 0 and samples.max() < lm.vocab_size


def test_no_chat_template_is_one_line(chat_folders):
    tokenizer = HFTokenizer.from_folder(chat_folders["none"])
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="has no chat template") as error:
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert str(chat_folders["none"]) in one_line(error)
    # Another template can still be given explicitly, as transformers allows.
    text = tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False)
    assert text.startswith("<s><|system|>")
    gguf_without = tokenizer_from_gguf_metadata(byte_level_metadata("gpt2"))
    with pytest.raises(ValueError, match="has no chat template") as error:
        gguf_without.apply_chat_template(MESSAGES)
    one_line(error)


@needs_tok512
def test_llama2c_vocabulary_has_no_chat_template():
    with pytest.raises(ValueError, match=r"^tok512\.bin has no chat template") as error:
        load_llama2c_tokenizer(TOKENIZER_FILE).apply_chat_template(MESSAGES)
    one_line(error)


def test_byte_level_gguf_chat_template_matches_transformers():
    from transformers import PreTrainedTokenizerFast

    chatml = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    metadata = dict(byte_level_metadata("smollm"), **{"tokenizer.chat_template": chatml})
    tokenizer = tokenizer_from_gguf_metadata(metadata)
    messages = [{"role": "user", "content": "hi 12"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi 12<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == tokenizer.encode(text, add_bos=False)
    assert ids.count(1) == 2 and ids.count(2) == 1  # <|im_start|> x2, <|im_end|> whole
    reference = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, chat_template=chatml)
    assert ids == reference.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    sentencepiece = tokenizer_from_gguf_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"],
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, 0.0],
            "tokenizer.chat_template": chatml,
        }
    )
    with pytest.raises(ValueError, match="sentencepiece GGUF vocabularies are not supported"):
        sentencepiece.apply_chat_template(messages)


# ------------------------------------------------------------------ one-line refusals


def test_quantized_and_encoder_decoder_checkpoints_are_refused_in_one_line(get_twin):
    llama = dict(get_twin("llama").hf_config)
    quantized = dict(llama, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match=r"^llama: quantized checkpoints \(.*gptq\)") as error:
        lmppl.lm.config_from_hf(quantized)
    one_line(error)
    t5 = {
        "model_type": "t5",
        "is_encoder_decoder": True,
        "architectures": ["T5ForConditionalGeneration"],
    }
    with pytest.raises(ValueError, match=r"^unsupported model type 't5' \(an encoder-decoder") as e:
        lmppl.lm.config_from_hf(t5)
    assert "supported: llama" in one_line(e)


def test_tokenizer_larger_than_the_model_is_refused(get_twin, tmp_path):
    twin = get_twin("gpt2")  # vocabulary 61
    twin.torch_model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path, CORPUS + ["xyzzy quux plugh frobnicate"] * 3, vocab_size=80)
    with pytest.raises(ValueError, match="tokenizer of 80 tokens for a model of 61") as error:
        lmppl.load(str(tmp_path))
    one_line(error)


def test_unreadable_tokenizer_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="transformers cannot load this tokenizer") as error:
        HFTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in one_line(error)
