"""The demo's "downloaded" Hugging Face model: loads with `transformers` and matches the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shoal.demo.tiny_model import write_tiny_hf_model
from shoal.errors import ShoalError
from shoal.models.config import from_hf_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return write_tiny_hf_model(tmp_path_factory.mktemp("demo") / "tiny-llama", seed=0)


def test_loads_with_auto_classes_and_matches_the_tokenizer(hf_dir: Path):
    names = sorted(p.name for p in hf_dir.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.bos_token_id == tok.bos_token_id == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert model.config.pad_token_id == tok.pad_token_id
    eos = model.config.eos_token_id
    assert tok.eos_token_id in eos and tok.convert_tokens_to_ids("<|end_of_text|>") in eos
    assert model.generation_config.eos_token_id == eos
    # Llama 3 traits: grouped-query attention, llama3 RoPE scaling, tied embeddings.
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_generates_from_a_chat_prompt(hf_dir: Path):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "林美住在哪裡？"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert int(out.max()) < len(tok)


def test_shoal_reads_the_config(hf_dir: Path):
    cfg = from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    assert (cfg.family, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 1024, True)
    assert cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3"


def test_weights_are_deterministic_for_a_seed(hf_dir: Path, tmp_path: Path):
    same = load_file(write_tiny_hf_model(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(write_tiny_hf_model(tmp_path / "other", seed=1) / "model.safetensors")
    reference = load_file(hf_dir / "model.safetensors")
    assert same.keys() == reference.keys() == other.keys()
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    assert not torch.equal(other["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])


def test_refuses_an_existing_directory(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ShoalError, match="already exists"):
        write_tiny_hf_model(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
