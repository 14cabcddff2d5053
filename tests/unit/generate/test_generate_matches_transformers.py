"""Greedy `shoal generate` against `transformers.generate` on the same weights, every family.

The oracle is the Hugging Face folder the checkpoint was imported from, loaded by transformers and
generating one prompt at a time (no padding), with the same chat template, the same number of new
tokens and the same end tokens. shoal generates the prompts together in one left-padded batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.helpers.generation import EOT_ID, TinyModel, shoal

PROMPTS = ["hello world how are you", "the quick brown fox jumps over the lazy dog and the fish swim", "what is shoal"]
MAX_NEW = 12


def hf_generate(hf_dir: Path, prompt_ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' greedy continuation of one prompt, the stop token removed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    new = out[0, len(prompt_ids):].tolist()
    return new[:-1] if new and new[-1] in eos else new


def chat_ids(tokenizer_dir: Path, text: str) -> list[int]:
    """The prompt as transformers' own tokenizer and chat template make it. Read from the folder
    shoal loads it from: transformers 5 swaps in a family tokenizer class when a folder has a
    config.json, which re-tokenizes this synthetic vocabulary differently."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run_generate(source: Path, tmp_path: Path, *extra: object) -> list[dict]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    assert shoal("generate", "--source", source, "--prompts", prompts, "--output", out, "--chat",
                 "--max_new_tokens", MAX_NEW, "--greedy", "--device", "cpu", *extra) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))
    return rows


def test_greedy_matches_transformers_every_family(tiny_model: TinyModel, tmp_path: Path):
    rows = run_generate(tiny_model.checkpoint, tmp_path)
    for row, text in zip(rows, PROMPTS):
        ids = chat_ids(tiny_model.checkpoint / "tokenizer", text)
        assert row["prompt_tokens"] == len(ids)
        assert row["token_ids"] == hf_generate(tiny_model.hf_dir, ids, MAX_NEW, [EOT_ID])
    # The comparison means something only if the continuations depend on their context.
    assert max(len(set(row["token_ids"])) for row in rows) > MAX_NEW // 2


def test_hugging_face_folder_is_converted_in_memory(llama: TinyModel, tmp_path: Path):
    """--source an HF folder gives what its import gives, and writes nothing into the folder."""
    before = sorted(p.name for p in llama.hf_dir.iterdir())
    rows = run_generate(llama.hf_dir, tmp_path)
    assert sorted(p.name for p in llama.hf_dir.iterdir()) == before
    ids = chat_ids(llama.hf_dir, PROMPTS[1])
    assert rows[1]["token_ids"] == hf_generate(llama.hf_dir, ids, MAX_NEW, [EOT_ID])


def test_stops_at_every_end_token_of_generation_config(llama: TinyModel, tmp_path: Path):
    """A generation_config.json naming a list of end tokens (Llama 3.1 Instruct names three): shoal
    stops at each, like transformers. The second end token is one the model does produce greedily."""
    ids = chat_ids(llama.checkpoint / "tokenizer", PROMPTS[0])
    free = hf_generate(llama.hf_dir, ids, MAX_NEW, [EOT_ID])
    # The first token produced for the first time after step 0 (random tiny models repeat a lot).
    stop = next(t for i, t in enumerate(free) if i >= 1 and t not in free[:i])
    hf_dir = tmp_path / "hf"
    shutil.copytree(llama.hf_dir, hf_dir)
    config = json.loads((hf_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [EOT_ID, stop]
    (hf_dir / "generation_config.json").write_text(json.dumps(config))
    assert shoal("import", "--source", hf_dir, "--output_path", tmp_path / "ckpt") == 0

    rows = run_generate(tmp_path / "ckpt", tmp_path)
    expected = hf_generate(hf_dir, ids, MAX_NEW, [EOT_ID, stop])
    assert rows[0]["token_ids"] == expected == free[:free.index(stop)]
    assert rows[0]["finish_reason"] == "stop"
