"""`shoal plan` as a user runs it: the seed's command lines with `plan` in front.

Oracles: the model's parameter count from `transformers` (LlamaConfig on the meta device), bytes
worked out by hand from the documented formulas (16 bytes per trained parameter for weights,
gradients and AdamW), the refusals the training command itself gives, and a token count read off
a hand-made .bin/.idx.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from shoal.cli import main

SEED_PRETRAIN = ["--executor", "local", "--experiment", "llama31_pretraining", "--num_nodes", "1", "--num_gpus", "8",
                 "--model_size", "8B", "--hf_model_id", "meta-llama/Llama-3.1-8B-Instruct",
                 "--nemo_model", "nemo_ckpt/Llama-3.1-8B-Instruct", "--max_steps", "100", "--global_batch_size", "2048",
                 "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "1", "--context_parallel_size", "1",
                 "--dataset_path", "data/custom_dataset/preprocessed/"]
SEED_FINETUNE = ["--executor", "local", "--experiment", "llama31_finetuning", "--num_nodes", "1", "--num_gpus", "8",
                 "--model_size", "8B", "--hf_model_id", "meta-llama/Llama-3.1-8B-Instruct", "--max_steps", "100",
                 "--global_batch_size", "128", "--tensor_model_parallel_size", "2", "--peft", "lora",
                 "--dataset_path", "data/alpaca"]


def plan(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["plan", *args])
    return rc, out.getvalue(), err.getvalue()


def hf_parameter_count() -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_seed_pretraining_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the seed's relative paths exist nowhere: the plan still answers
    rc, out, _ = plan("pretrain", *SEED_PRETRAIN, "--gpu", "h100", "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["parameters"] == hf_parameter_count() and result["world_size"] == 8
    est = result["estimate"]
    assert est["layout"]["tp"] == 2 and est["layout"]["dp"] == 4 and est["fits"]
    # 8 × H100: the 4 B/parameter unsharded gradients exceed 1/8 of 80 GB, so FSDP syncs every micro-batch.
    assert est["deferred_gradient_sync"] is False
    # Sharded over FSDP's 4 ranks after TP2: fp32 weights and AdamW's two fp32 moments, by hand.
    n = hf_parameter_count()
    assert est["memory_gib"]["parameters"] == pytest.approx(4 * n / 2 / 4 / 2**30)
    assert est["memory_gib"]["optimizer"] == pytest.approx(8 * n / 2 / 4 / 2**30)
    assert est["checkpoint_bytes"] == 12 * n  # fp32 weights + two fp32 moments
    assert est["run_seconds"] == pytest.approx(100 * est["step_seconds"])
    assert est["step_seconds"] == pytest.approx(2048 * 8192 / (est["tokens_per_s_per_gpu"] * 8))
    assert est["mfu_reference"]["source"].startswith("bench/results/")

    rc, text, _ = plan("pretrain", *SEED_PRETRAIN, "--gpu", "h100")
    assert rc == 0 and "fits" in text and "tokens/s/GPU" in text and "measured by shoal's benchmarks" in text


def test_seed_finetuning_command_and_a_benchmarked_layout():
    rc, text, _ = plan("finetune", *SEED_FINETUNE, "--gpu", "h200")
    assert rc == 0 and "lora, rank 32" in text and "fits" in text
    # Its checkpoints hold the adapters only: rank 32 on the 7 projections of 32 layers (shapes of
    # Llama-3.1-8B: hidden 4096, kv 1024, MLP 14336), in fp32 with AdamW's two fp32 moments.
    adapters = 32 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    rc, out, _ = plan("finetune", *SEED_FINETUNE, "--gpu", "h200", "--json")
    assert json.loads(out)["estimate"]["checkpoint_bytes"] == 12 * adapters
    assert "checkpoint on disk: 1.01 GB (fp32 adapters (the base is not copied) 0.34 GB + optimizer 0.67 GB)" in text
    rc, out, _ = plan("finetune", *SEED_FINETUNE, "--checkpoint.adapter_only=false", "--gpu", "h200", "--json")
    assert json.loads(out)["estimate"]["checkpoint_bytes"] > 32e9  # the whole model's fp32 weights
    # The benchmarked LoRA run (TP2 × DP2 on 4 × H200): its own figure is the reference, and the
    # memory is within the planner's ±10% target of the 16.3 GiB measured.
    # The benchmark ran before the seed's fine-tuning defaults (seq 8192, every linear layer) were shoal's.
    args = [a if a != "8" else "4" for a in SEED_FINETUNE]
    args += ["--seq_length", "2048", "--peft.target_modules=q_proj,k_proj,v_proj,o_proj"]
    rc, out, _ = plan("finetune", *args, "--gpu", "h200", "--json")
    est = json.loads(out)["estimate"]
    assert est["mfu_reference"]["name"] == "seed_finetune_lora_tp2dp2_h200"
    assert est["tokens_per_s_per_gpu"] == pytest.approx(4061, rel=0.02)
    assert est["memory_gib"]["allocated"] == pytest.approx(16.29, rel=0.10)


def test_a_layout_that_cannot_fit_says_what_to_change():
    # The llama31_70b recipe pipelines over 4 stages: TP2 × PP4 on 8 GPUs runs, but cannot fit.
    rc, text, _ = plan("finetune", "--model", "llama31_70b", "--num_gpus", "8", "-T", "2", "-g", "128",
                       "--max_steps", "10", "--dataset_path", "data", "--gpu", "h100")
    assert rc == 1 and "DOES NOT FIT" in text
    # 70.55B parameters × 16 bytes over 90% of an H100's 79.19 GiB = 14.75: at least 15 GPUs, by hand.
    assert "need at least 15 × H100 80GB" in text and "--peft lora" in text

    rc, text, _ = plan("pretrain", "--model", "llama31_8b", "--num_gpus", "8", "-T", "1", "-g", "64",
                       "--parallel.activation_checkpointing=none", "--seq_length", "8192", "-m", "4",
                       "--max_steps", "1", "--gpu", "a100-40gb")
    assert rc == 1 and "DOES NOT FIT" in text and "layouts that fit" in text and "change:" in text


def test_refusals():
    rc, _, err = plan("pretrain", "--model", "llama31_8b", "--gpu", "tpu")
    assert rc == 2 and "--gpu 'tpu': unknown GPU kind" in err
    rc, text, _ = plan("pretrain", "--model", "llama31_8b", "--num_gpus", "6", "-T", "4", "--max_steps", "1")
    assert rc == 1 and "this layout cannot run: world size 6 is not divisible" in text
    rc, _, err = plan("pretrain", "--max_steps", "1")
    assert rc == 2 and "needs the model's shape" in err
    rc, _, err = plan("pretrain", "--model", "llama31_8b", "--fp8", "--num_gpus", "8")  # a layout that runs
    assert rc == 2 and "'fp8' is not modelled" in err


def test_one_epoch_of_the_dataset(tmp_path):
    from shoal.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(tmp_path / "corpus_text_document", dtype=np.int32) as writer:
        for length in (1000, 3000, 6000):  # 10,000 tokens in three documents
            writer.add_document(np.arange(length) % 100)
    rc, out, _ = plan("pretrain", "--model", "llama32_1b", "--dataset_path", str(tmp_path), "--seq_length", "100",
                      "-g", "10", "--data.split=80,20,0", "--json")
    result = json.loads(out)
    # 80% of 10,000 tokens for training, 1,000 tokens per step: 8 steps.
    assert result["estimate"]["steps"] == 8 and "one epoch" in result["steps_source"]


def test_the_model_comes_from_the_starting_checkpoint(tmp_path):
    """--nemo_model on this machine: the shape is its shoal.json's, whatever the recipe's preset."""

    from transformers import AutoModelForCausalLM

    from tests.helpers.hf_models import write_small_hf_model

    hf = write_small_hf_model(tmp_path / "hf")
    assert main(["import", "--source", str(hf), "--output_path", str(tmp_path / "ckpt")]) == 0
    rc, out, _ = plan("finetune", "--recipe", "tiny", "--nemo_model", str(tmp_path / "ckpt"), "--max_steps", "2",
                      "--dataset_path", str(tmp_path), "--gpu", "h100", "--json")
    result = json.loads(out)
    assert rc == 0 and result["model_source"] == f"checkpoint {tmp_path / 'ckpt'}"
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(hf).parameters())
    assert result["parameters"] == expected


def test_the_seeds_mixture_of_experts_model_is_planned():
    """Qwen3-30B-A3B with LoRA on one H200: the planner used to refuse every MoE model. The weights
    are the model's own count (transformers' Qwen3MoeConfig count is checked in tests/unit/models),
    the base frozen in bf16 with the fp32 adapters; the speed is flagged as a dense model's."""
    from shoal.models import get_preset

    rc, text, err = plan("finetune", "--model", "qwen3_30b_a3b", "--peft", "lora", "--num_gpus", "1",
                         "--gpu", "h200", "--seq_length", "2048", "--micro_batch_size", "1")
    assert rc == 0, text + err
    total = get_preset("qwen3_30b_a3b").num_params
    adapters = 48 * 32 * (2 * (2048 + 4096) + 2 * (2048 + 512))  # rank 32 on q, o (2048 <-> 4096) and k, v (-> 512)
    params_line = next(line for line in text.splitlines() if line.strip().startswith("parameters"))
    planned_gib = float(params_line.split()[-2])
    assert planned_gib == pytest.approx((2 * total + 4 * adapters) / 2**30, abs=0.06), params_line
    assert "mixture of experts: the MFU is a dense model's" in text
    assert "fits" in text
