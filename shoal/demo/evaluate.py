"""Exact-match accuracy of a Hugging Face checkpoint on `{"input", "output"}` rows.

Uses `transformers` alone (no shoal code) to load and generate, so the demo's final figure says
what a user of the exported model will see.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


@torch.no_grad()
def answer(model_dir: Path, questions: list[str], max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy answers to each question, rendered with the checkpoint's own chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"  # generation continues every row from its own last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions[start : start + batch_size]
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1] :]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def exact_match(model_dir: Path, rows: list[dict[str, str]]) -> tuple[float, list[str]]:
    """Fraction of rows whose generated answer equals `output` exactly, and the answers."""
    answers = answer(model_dir, [r["input"] for r in rows])
    hits = sum(a == r["output"].strip() for a, r in zip(answers, rows))
    return hits / max(1, len(rows)), answers
