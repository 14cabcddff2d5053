"""What `--source` may name beyond an imported checkpoint (a LoRA fine-tuning experiment), and
the inputs `shoal generate` must refuse with a message naming the file, line or flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_generate_matches_transformers import PROMPTS, chat_ids, hf_generate

from tests.helpers.generation import EOT_ID, TinyModel, shoal


@pytest.fixture(scope="module")
def lora_experiment(llama: TinyModel, tmp_path_factory) -> Path:
    """Two LoRA steps of `shoal finetune` at a high learning rate, so the adapters change the answers."""
    from shoal.demo.corpus import write_instruction_set

    root = tmp_path_factory.mktemp("lora")
    write_instruction_set(root / "sft", sizes=(16, 8, 8))
    assert shoal("finetune", "--recipe", "tiny", "--results_dir", root / "res", "--experiment", "lora",
                 "--nemo_model", llama.checkpoint, "--dataset_path", root / "sft", "--seq_length", 64,
                 "-g", 2, "-m", 2, "--max_steps", 2, "--peft", "lora", "--peft.rank=4", "--peft.alpha=8",
                 "--peft.dropout=0.0", "--peft.target_modules=[q_proj,v_proj,down_proj]", "--train.lr=5e-2",
                 "--train.precision=fp32", "--train.warmup_steps=0", "--train.limit_val_batches=1",
                 "--data.num_workers=0") == 0
    return root / "res" / "lora"


def test_lora_experiment_generates_what_its_merged_export_generates(llama: TinyModel, lora_experiment: Path,
                                                                     tmp_path: Path, capsys):
    """The adapters are applied (the answers change) and equal, token for token, what transformers
    generates from `shoal export`'s merged model; the experiment's latest checkpoint is named."""
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert shoal("generate", "--source", lora_experiment, "--prompts", prompts, "--chat", "--greedy",
                 "--max_new_tokens", 12, "--device", "cpu", "--output", out) == 0
    said = capsys.readouterr().err
    assert "latest checkpoint step=000002-" in said and "LoRA/DoRA adapters" in said
    assert shoal("export", "--source", lora_experiment, "--output_path", tmp_path / "merged") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    changed = False
    for row, text in zip(rows, PROMPTS):
        ids = chat_ids(llama.checkpoint / "tokenizer", text)
        assert row["token_ids"] == hf_generate(tmp_path / "merged", ids, 12, [EOT_ID])
        changed |= row["token_ids"] != hf_generate(llama.hf_dir, ids, 12, [EOT_ID])
    assert changed, "the adapters did not change any answer: the test would not see them ignored"
    ckpt = next((lora_experiment / "checkpoints").iterdir())
    assert sorted(p.name for p in ckpt.iterdir()) == ["model", "optim", "peft.json", "shoal.json", "tokenizer",
                                                       "trainer.json"]  # nothing merged on disk


def run_failing(capsys, *args: object) -> str:
    assert shoal("generate", *args) == 2
    return capsys.readouterr().err


def test_source_that_is_not_a_checkpoint(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    err = run_failing(capsys, "--source", tmp_path / "empty", "--prompt", "hi", "--device", "cpu")
    assert "is not a shoal checkpoint" in err and str(tmp_path / "empty") in err
    err = run_failing(capsys, "--source", tmp_path / "missing", "--prompt", "hi", "--device", "cpu")
    assert "does not exist" in err


def test_bad_prompt_file_line_is_named(llama: TinyModel, tmp_path: Path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n\n{"prompt": "a", \n{"messages": []}\n')
    err = run_failing(capsys, "--source", llama.checkpoint, "--prompts", prompts, "--device", "cpu")
    assert f"{prompts}:3: invalid JSON" in err
    prompts.write_text('{"prompt": "hello"}\n{"text": "a"}\n')
    err = run_failing(capsys, "--source", llama.checkpoint, "--prompts", prompts, "--device", "cpu")
    assert f"{prompts}:2: expected a \"prompt\" string or a \"messages\" list" in err
    prompts.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    err = run_failing(capsys, "--source", llama.checkpoint, "--prompts", prompts, "--device", "cpu")
    assert f"{prompts}:1: messages[0]" in err


def test_existing_output_is_not_overwritten(llama: TinyModel, tmp_path: Path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    err = run_failing(capsys, "--source", llama.checkpoint, "--prompt", "hi", "--output", out, "--device", "cpu")
    assert "exists; pass --overwrite" in err and out.read_text() == "mine\n"


def test_bad_sampling_flags_and_lengths(llama: TinyModel, capsys):
    err = run_failing(capsys, "--source", llama.checkpoint, "--prompt", "hi", "--top_p", "1.5", "--device", "cpu")
    assert "--top_p must be in (0, 1]" in err
    err = run_failing(capsys, "--source", llama.checkpoint, "--prompt", "hi", "--max_new_tokens", "600",
                      "--device", "cpu")
    assert "max_position_embeddings (512)" in err


def test_chat_without_a_template_is_refused(llama: TinyModel, tmp_path: Path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama.checkpoint, ckpt)
    config = json.loads((ckpt / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (ckpt / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    (ckpt / "tokenizer" / "chat_template.jinja").unlink(missing_ok=True)
    err = run_failing(capsys, "--source", ckpt, "--prompt", "hi", "--chat", "--device", "cpu")
    assert "no chat template" in err
