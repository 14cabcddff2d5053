"""The seed's runs, not only its command lines (issue 13): the seed's values, a dry run that starts
nothing and shows the run, and the first-run defects of the training commands.

Oracles: the seed's scripts as written (NeMo-Tutorial pretraining/pretrain.py, finetuning/finetune.py:
`--lr` default 1e-5, fine-tuning 5e-6, seq 8192 packed, NeMo's LoRA default, save_top_k 10, validation
every max_steps // 5 above 100 / 1000 steps), hand-worked schedule values, and the files on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from shoal.config.recipe import TrainSection
from shoal.models.presets import get_preset
from shoal.train.run_plan import validation_interval, warmup_steps
from shoal.train.schedule import lr_at
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_metrics, train_args, val_records, write_seed_world

SEED_PRETRAIN = [
    "pretrain", "--executor", "local", "--experiment", "llama31_pretraining", "--num_nodes", "1", "--num_gpus", "8",
    "--model_size", "8B", "--hf_model_id", "meta-llama/Llama-3.1-8B-Instruct", "--max_steps", "100",
    "--global_batch_size", "2048", "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "1",
    "--context_parallel_size", "1",
]
SEED_FINETUNE = [
    "finetune", "--executor", "local", "--experiment", "llama31_finetuning", "--num_nodes", "1", "--num_gpus", "8",
    "--model_size", "8B", "--hf_model_id", "meta-llama/Llama-3.1-8B-Instruct", "--max_steps", "100",
    "--global_batch_size", "128", "--tensor_model_parallel_size", "2", "--peft", "lora",
]


@pytest.fixture(scope="module")
def seed_world(tmp_path_factory: pytest.TempPathFactory, train_assets: TrainAssets) -> Path:
    """An "imported Llama-3.1-8B" (its shoal.json and tokenizer; one stand-in tensor, since a dry run
    reads no weights), a corpus long enough for the seed's 100 × 2048 × 8192-token run, and the SFT set."""
    return write_seed_world(tmp_path_factory.mktemp("seed_world"), "llama31_8b", "Llama-3.1-8B-Instruct", train_assets)


def dry_run(monkeypatch, root: Path, argv: list[str], capsys) -> tuple[dict, str]:
    monkeypatch.chdir(root)
    assert shoal(*argv, "--dryrun") == 0
    out = capsys.readouterr().out
    recipe_text = out.split("# what would run")[0]
    return yaml.safe_load(recipe_text), out


def test_seed_pretraining_dry_run_has_the_seed_values_and_starts_nothing(seed_world, monkeypatch, capsys):
    """Fails before issue 13: LR 3e-4, top-1, and a one-process dry run that trained."""
    argv = [*SEED_PRETRAIN, "--nemo_model", "nemo_ckpt/Llama-3.1-8B-Instruct",
            "--dataset_path", "data/custom_dataset/preprocessed/"]
    recipe, out = dry_run(monkeypatch, seed_world, argv, capsys)
    assert recipe["train"]["lr"] == 1e-5  # pretrain.py: --lr default 1e-5
    assert recipe["data"]["seq_length"] == 8192 and recipe["train"]["global_batch_size"] == 2048
    assert recipe["checkpoint"]["save_top_k"] == 10
    assert recipe["train"]["val_check_interval"] == "seed"
    assert recipe["parallel"]["tensor_model_parallel_size"] == 2 and recipe["launch"]["num_gpus"] == 8
    # NeMo's 2,000-step warmup does not fit the seed's 100 steps: cut, and said so.
    assert "warming up for 10 steps" in out
    assert "validation at the end" in out  # 100 steps: not > 1000
    assert "layout: 8 process(es) = tensor 2 × pipeline 1 × context 1 × data 4" in out
    assert "torch.distributed.run" in out and "--nproc_per_node=8" in out and "--dryrun" not in out.split("launch:")[1]
    assert "documents 8" in out and "tokens 8,000,000" in out
    assert not (seed_world / "results").exists()  # nothing written: no experiment folder


def test_seed_finetuning_dry_run_has_the_seed_values(seed_world, monkeypatch, capsys):
    """Fails before issue 13: seq 2048, LoRA rank 16 on q/k/v/o, LR 1e-4, top-1."""
    argv = [*SEED_FINETUNE, "--nemo_model", "nemo_ckpt/Llama-3.1-8B-Instruct", "--dataset_path", "data/alpaca"]
    recipe, out = dry_run(monkeypatch, seed_world, argv, capsys)
    assert recipe["train"]["lr"] == 5e-6  # finetune.py: recipe.optim.config.lr = 5e-6
    assert recipe["data"]["seq_length"] == 8192 and recipe["data"]["pack_sequences"] is True
    peft = recipe["peft"]
    assert (peft["rank"], peft["alpha"], peft["dropout"], peft["use_dora"]) == (32, 32.0, 0.0, False)
    assert peft["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert recipe["checkpoint"]["save_top_k"] == 10
    assert "warming up for 10 steps" not in out and "warmup 50 steps" in out  # NeMo's 50 fit in 100 steps
    assert "validation at the end" in out  # max_steps 100: not > 100
    assert "LoRA rank 32 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out
    assert not (seed_world / "results").exists()


def test_dry_run_in_one_process_trains_nothing(train_assets: TrainAssets, tmp_path: Path, capsys):
    """Fails before issue 13: with one process, --dryrun really trained and wrote checkpoints."""
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 2), "--dryrun") == 0
    out = capsys.readouterr().out
    assert "one process in this shell" in out and "start: weights of" in out
    assert not results.exists()


def test_dry_run_refuses_a_layout_before_anything_starts(seed_world, monkeypatch, capsys):
    argv = [*SEED_PRETRAIN, "--nemo_model", "nemo_ckpt/Llama-3.1-8B-Instruct",
            "--dataset_path", "data/custom_dataset/preprocessed/", "-T", "3"]
    monkeypatch.chdir(seed_world)
    assert shoal(*argv, "--dryrun") == 2
    assert "not divisible" in capsys.readouterr().err


# -- the seed's run-length rules, by hand --------------------------------------------------------


def test_seed_validation_interval():
    seed = TrainSection(val_check_interval="seed")
    assert validation_interval(seed, "finetune", 100) is None  # max_steps 100: not > 100, at the end
    assert validation_interval(seed, "finetune", 101) == 20  # 101 // 5
    assert validation_interval(seed, "pretrain", 1000) is None
    assert validation_interval(seed, "pretrain", 5000) == 1000
    assert validation_interval(TrainSection(val_check_interval=7), "pretrain", 5000) == 7


def test_a_warmup_longer_than_the_run_is_cut_to_a_tenth():
    """Fails before issue 13: lr_at used the 2,000-step warmup, so 100 steps reached 5% of the peak."""  # noqa: E501
    t = TrainSection(lr=1e-5, min_lr=0.0, warmup_steps=2000, lr_schedule="linear")
    assert warmup_steps(t, 100) == 10
    # NeMo's warmup ramp over the 10 steps: (s + 1) / (10 + 1) of the peak; step 10 is the first at the peak.
    assert lr_at(0, t, 100) == pytest.approx(1e-5 / 11)
    assert lr_at(9, t, 100) == pytest.approx(1e-5 * 10 / 11)
    assert lr_at(10, t, 100) == pytest.approx(1e-5)
    assert lr_at(55, t, 100) == pytest.approx(0.5e-5)  # linear decay: (55 - 10) / 90 of the way down
    assert warmup_steps(TrainSection(warmup_steps=50), 100) == 50


# -- first-run defects of the training commands --------------------------------------------------


def test_validation_split_smaller_than_a_global_batch_is_still_validated(train_assets, tmp_path, capsys):
    """Fails before issue 13: 16 validation sequences < global batch 32 meant no validation at all."""
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "finetune", results, "ft", "--max_steps", 1, "-g", 32)) == 0
    err = capsys.readouterr().err
    assert "fewer than one global batch (32); validating on 12 of them" in err  # 16 rows packed into 12
    assert list(val_records(results / "ft")) == [1]


def test_a_global_batch_larger_than_the_training_set_is_warned(train_assets, tmp_path, capsys):
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "finetune", results, "ft", "--max_steps", 1, "-g", 64)) == 0
    assert "is larger than the training set" in capsys.readouterr().err


def test_every_run_says_what_it_starts_from(train_assets, tmp_path, capsys):
    """Fails before issue 13: fine-tuning without --nemo_model picked a pretraining checkpoint silently."""
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "pre", "--max_steps", 1)) == 0
    capsys.readouterr()
    args = train_args(train_assets, "finetune", results, "ft", "--max_steps", 1)
    del args[args.index("--nemo_model"):args.index("--nemo_model") + 2]
    assert shoal(*args) == 0
    err = capsys.readouterr().err
    assert f"finetune from weights of {results / 'pre' / 'checkpoints'}" in err
    assert "plan: 1 steps of" in err


def test_training_checkpoints_keep_the_imported_generation_config(train_assets, tmp_path):
    """Fails before issue 13: shoal.json of a training checkpoint had `extra: {}`, so the export
    rebuilt generation_config.json from config.json (other eos ids, no sampling defaults)."""
    hf = tmp_path / "hf"
    shutil.copytree(train_assets.hf_model, hf)
    gen = {"bos_token_id": 1008, "eos_token_id": [1009, 1017], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (hf / "generation_config.json").write_text(json.dumps(gen))
    assert shoal("import", "--source", hf, "--output_path", tmp_path / "ck") == 0
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1)
    args[args.index("--nemo_model") + 1] = str(tmp_path / "ck")
    assert shoal(*args) == 0
    (trained,) = (tmp_path / "res" / "e" / "checkpoints").iterdir()
    extra = json.loads((trained / "shoal.json").read_text())["extra"]
    assert {k: extra["generation_config"][k] for k in gen} == gen
    assert shoal("export", "--source", trained, "--output_path", tmp_path / "out") == 0
    exported = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert {k: exported[k] for k in gen} == gen


def test_dataset_path_may_name_the_training_file(train_assets, tmp_path, capsys):
    """Fails before issue 13: `--dataset_path DIR/training.jsonl` said "training.jsonl not found"."""
    args = train_args(train_assets, "finetune", tmp_path / "res", "ft", "--max_steps", 1)
    args[args.index("--dataset_path") + 1] = str(train_assets.sft_dir / "training.jsonl")
    assert shoal(*args) == 0
    assert "is a file; reading the splits of its folder" in capsys.readouterr().err


def test_nemo_model_messages_say_what_is_wrong(train_assets, tmp_path, capsys):
    """Fails before issue 13: a Hugging Face folder and a missing path both said "no shoal.json"."""
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1)
    where = args.index("--nemo_model") + 1
    args[where] = str(train_assets.hf_model)
    assert shoal(*args) == 2
    assert "Hugging Face model folder" in (err := capsys.readouterr().err) and "shoal import --source" in err
    args[where] = str(tmp_path / "nowhere")
    assert shoal(*args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shape_mismatch_names_the_flag_and_both_shapes(train_assets, tmp_path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1, "--model_size", "8B")
    assert shoal(*args) == 2
    err = capsys.readouterr().err
    assert "--model/--model_size" in err and "hidden 64" in err and "hidden 4096" in err


def test_every_training_flag_has_help():
    """Fails before issue 13: --seq_length, --lr, -g, -T/-P/-C, --peft, --wandb* had no help text."""
    import argparse

    from shoal.config.flags import add_training_arguments

    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert missing == []


def test_metrics_record_the_validation_of_the_seed_rule(train_assets, tmp_path):
    """`val_check_interval: seed` on a short run validates once, at the end."""
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 3,
                             "--train.val_check_interval=seed")) == 0
    assert list(val_records(results / "e")) == [3]
    assert [r["step"] for r in read_metrics(results / "e") if "loss" in r] == [1, 2, 3]


def test_lora_mfu_counts_the_flops_a_frozen_base_needs():
    """Fails before issue 15's MFU fix: LoRA runs reported 6N per token, though a frozen base needs
    no weight-gradient matmul. By hand for llama_tiny at S=32: forward 2N, input gradient 2N (4N),
    plus attention 12·L·H·Dh·S."""
    cfg = get_preset("llama_tiny")
    n, attention = cfg.num_params, 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 32
    assert cfg.flops_per_token(32) == 6 * n + attention
    assert cfg.flops_per_token(32, frozen_params=n) == 4 * n + attention


def test_mfu_counts_the_output_layer_for_loss_tokens_only():
    """A prompt token's logits are not needed (and on one process not computed): by hand, the output
    layer's V·E parameters cost 6 (full) or 4 (frozen) FLOPs per parameter for the loss tokens only."""
    cfg = get_preset("llama_tiny")
    n, attention = cfg.num_params, 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 32
    head = cfg.vocab_size * cfg.hidden_size
    assert cfg.flops_per_token(32, loss_token_fraction=0.75) == 6 * n + attention - 0.25 * 6 * head
    assert cfg.flops_per_token(32, frozen_params=n, loss_token_fraction=0.5) == 4 * n + attention - 0.5 * 4 * head
    assert cfg.flops_per_token(32, loss_token_fraction=1.0) == 6 * n + attention


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_logged_mfu_counts_the_run_s_share_of_loss_tokens(train_assets, tmp_path, monkeypatch, stage):
    """The trainer hands MFU the FLOPs per token of each logging window's loss-token share: all of
    a pretraining row's tokens carry loss, an instruction row's prompt does not."""
    from shoal.checkpoint.format import read_model_config
    from shoal.train import trainer

    seen = []
    real = trainer.mfu_fields
    monkeypatch.setattr(trainer, "mfu_fields", lambda tps, fpt, *a, **k: seen.append(fpt) or real(tps, fpt, *a, **k))
    assert shoal(*train_args(train_assets, stage, tmp_path / "res", "e", "--max_steps", 2)) == 0
    cfg = read_model_config(train_assets.checkpoint)
    seq = 32 if stage == "pretrain" else 64
    head = 6 * cfg.vocab_size * cfg.hidden_size
    shares = [1 - (cfg.flops_per_token(seq) - fpt) / head for fpt in seen]
    assert len(shares) == 2
    if stage == "pretrain":
        assert shares == pytest.approx([1.0, 1.0])
    else:
        assert all(0 < share < 1 for share in shares), shares  # short answers in padded rows: a few %


def test_a_run_writes_its_report_at_the_end(train_assets, tmp_path, capsys):
    """Issue 17: `shoal pretrain/finetune` write report.png/report.html when they finish."""
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 2, "--logging.report=true")) == 0
    assert (results / "e" / "report.html").stat().st_size > 0 and (results / "e" / "report.png").stat().st_size > 0
    assert f"report of the run: {results / 'e' / 'report.html'}" in capsys.readouterr().err
