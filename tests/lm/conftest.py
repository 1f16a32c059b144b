"""Tiny random-initialised ``transformers`` models and their lmppl twins (no download).

Each case is a PyTorch causal LM built from a small config, its weights re-drawn with a
larger spread than Hugging Face's initialisation (std 0.02 makes every logit nearly the
same, which would hide errors), and the lmppl network built from its state dict. torch and
transformers are imported on first use, so other tests in this folder do not pay for them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from lmppl.lm.base import LanguageModel
from lmppl.lm.build import build_network, config_from_hf

if TYPE_CHECKING:
    import torch

VOCAB = 61
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
LLAMA_LIKE = dict(SMALL, num_attention_heads=4, max_position_embeddings=32)

CASES = sorted(["llama", "llama_gqa_untied", "qwen2", "mistral", "gpt2", "gpt_neo"])


def hf_config(case: str) -> Any:
    """The ``transformers`` config of one case."""
    import transformers

    configs = {
        "llama": lambda: transformers.LlamaConfig(
            **LLAMA_LIKE, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500.0
        ),
        "llama_gqa_untied": lambda: transformers.LlamaConfig(
            **LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False
        ),
        "qwen2": lambda: transformers.Qwen2Config(
            **LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False
        ),
        "mistral": lambda: transformers.MistralConfig(
            **LLAMA_LIKE, num_key_value_heads=1, sliding_window=None, head_dim=8
        ),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, **SPECIAL_IDS
        ),
        "gpt_neo": lambda: transformers.GPTNeoConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=4,
            num_heads=4,
            attention_types=[[["global", "local"], 2]],
            window_size=3,
            max_position_embeddings=32,
            **SPECIAL_IDS,
        ),
    }
    return configs[case]()


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter: norm weights ~ 1 + N(0, 0.1^2), the rest ~ N(0, 0.15^2)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            is_norm_weight = name.endswith("weight") and parameter.ndim == 1
            parameter.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.15 * noise)
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


def make_twin(case: str, seed: int = 0) -> Twin:
    import torch
    import transformers

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


_TWINS: dict[str, Twin] = {}


@pytest.fixture(params=CASES)
def twin(request) -> Twin:
    """One model per case, shared by every test of the session."""
    if request.param not in _TWINS:
        _TWINS[request.param] = make_twin(request.param)
    return _TWINS[request.param]


@pytest.fixture
def get_twin():
    """``get_twin(case)``: the shared twin of one case."""

    def get(case: str) -> Twin:
        if case not in _TWINS:
            _TWINS[case] = make_twin(case)
        return _TWINS[case]

    return get
