"""Qwen3-MoE through the training commands: `shoal pretrain` trains as transformers + AdamW would,
LoRA fine-tuning adapts the attention (and leaves the experts alone) or, with the MLP targets,
the routed experts too, and the seed's command line with `--model qwen3_30b_a3b` resolves.

Oracles: a tiny `Qwen3MoeForCausalLM` made by transformers (with the demo tokenizer), imported
with `shoal import`; transformers' own `aux_loss` (`output_router_logits=True`) per micro-batch,
added as `router_aux_loss_coef · aux / micro-batches` (the gradient accumulation transformers'
Trainer does); `peft.PeftModel` and `transformers` loading shoal's exports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_dcp, train_args, train_records, write_seed_world

STEPS, GBS, MBS, SEQ = 4, 4, 2, 32
LR, WEIGHT_DECAY, BETAS, EPS = 5e-3, 0.5, (0.9, 0.95), 1e-8
AUX_COEF = 0.1  # large, so that leaving the aux loss out would show in the losses and gradient norms
MOE_SHAPE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                 norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=256, rms_norm_eps=1e-6,
                 router_aux_loss_coef=AUX_COEF, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory, train_assets: TrainAssets) -> tuple[Path, Path]:
    """(the HF folder, its shoal import): a tiny Qwen3-MoE with the training assets' tokenizer."""
    return make_moe_checkpoint(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def sparse_moe_checkpoint(tmp_path_factory: pytest.TempPathFactory, train_assets: TrainAssets) -> tuple[Path, Path]:
    """The same with every layer sparse (as in Qwen3-30B-A3B): PEFT can load adapters on all its MLPs."""
    return make_moe_checkpoint(tmp_path_factory.mktemp("sparse_moe"), mlp_only_layers=[])


def make_moe_checkpoint(root: Path, **overrides) -> tuple[Path, Path]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from shoal.demo.tiny_model import tiny_llama_config
    from shoal.demo.tokenizer import TOKENIZER_DIR

    ids = tiny_llama_config()
    config = Qwen3MoeConfig(vocab_size=ids.vocab_size, bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id,
                            pad_token_id=ids.pad_token_id, **{**MOE_SHAPE, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(config).float()
        with torch.no_grad():  # a decisive router (HF's std 0.02 routes almost uniformly)
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.5)
    model.save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "hf" / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    assert shoal("import", "--source", root / "hf", "--output_path", root / "ckpt") == 0
    return root / "hf", root / "ckpt"


def moe_args(assets: TrainAssets, ckpt: Path, stage: str, results: Path, experiment: str, *extra) -> list[str]:
    args = train_args(assets, stage, results, experiment, *extra)
    args[args.index("--nemo_model") + 1] = str(ckpt)
    return args


def transformers_run(hf_dir: Path, samples: list[dict[str, torch.Tensor]]) -> tuple[list, list, list, list]:
    """Per step: CE per loss token, gradient norm, mean aux loss over the micro-batches, and the
    routing counts [sparse layers, X] of the step's tokens, from transformers' router logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    micro_batches = GBS // MBS
    losses, norms, auxes, counts = [], [], [], []
    for step in range(STEPS):
        batch = samples[step * GBS:(step + 1) * GBS]
        loss_tokens = sum(s["loss_mask"].sum() for s in batch).item()
        total, aux_total, step_counts = 0.0, 0.0, 0
        for first in range(0, GBS, MBS):
            micro = {k: torch.stack([s[k] for s in batch[first:first + MBS]]) for k in ("tokens", "labels", "loss_mask")}
            out = model(input_ids=micro["tokens"], output_router_logits=True)
            per_token = F.cross_entropy(out.logits.flatten(0, 1).float(), micro["labels"].flatten(), reduction="none")
            loss_sum = (per_token * micro["loss_mask"].flatten()).sum()
            (loss_sum / loss_tokens + AUX_COEF * out.aux_loss / micro_batches).backward()
            total += loss_sum.item()
            aux_total += out.aux_loss.item()
            chosen = [torch.topk(logits.softmax(-1), MOE_SHAPE["num_experts_per_tok"]).indices
                      for logits in out.router_logits]
            step_counts = step_counts + torch.stack(
                [torch.bincount(c.flatten(), minlength=MOE_SHAPE["num_experts"]) for c in chosen]).double()
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm=1e9).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / loss_tokens)
        auxes.append(aux_total / micro_batches)
        counts.append(step_counts)
    return losses, norms, auxes, counts


def test_pretrain_matches_transformers_adamw_with_the_aux_loss(train_assets, moe_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from shoal.data.gpt_dataset import build_pretrain_datasets

    hf_dir, ckpt = moe_checkpoint
    args = moe_args(train_assets, ckpt, "pretrain", tmp_path, "pre", "--max_steps", STEPS, f"--train.lr={LR}",
                    "--train.lr_schedule=constant", f"--train.weight_decay={WEIGHT_DECAY}",
                    f"--train.adam_beta1={BETAS[0]}", f"--train.adam_beta2={BETAS[1]}", f"--train.adam_eps={EPS}",
                    "--train.grad_clip=1e9")
    assert shoal(*args) == 0
    records = train_records(tmp_path / "pre")

    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    train, _, _ = build_pretrain_datasets([str(train_assets.data_dir / "corpus_text_document")], SEQ, 1234,
                                          split="95,5,0", num_samples=(STEPS * GBS, None, 0),
                                          eod_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    samples = [train[i] for i in range(STEPS * GBS)]
    losses, norms, auxes, counts = transformers_run(hf_dir, samples)

    assert sorted(records) == list(range(1, STEPS + 1))
    for step, (loss, norm, aux, count) in enumerate(zip(losses, norms, auxes, counts), start=1):
        assert records[step]["loss"] == pytest.approx(loss, rel=1e-5), f"step {step}"  # CE only
        assert records[step]["aux_loss"] == pytest.approx(aux, rel=1e-5), f"step {step}"
        # Router health: the busiest and idlest expert of the worst layer, relative to an even share
        # (GBS·SEQ·K / X routing slots per expert and layer).
        even = GBS * SEQ * MOE_SHAPE["num_experts_per_tok"] / MOE_SHAPE["num_experts"]
        assert count.sum(1).tolist() == [even * MOE_SHAPE["num_experts"]] * 2
        assert records[step]["expert_load_max"] == pytest.approx(count.max().item() / even, rel=1e-9)
        assert records[step]["expert_load_min"] == pytest.approx(count.min().item() / even, rel=1e-9)
        assert records[step]["grad_norm"] == pytest.approx(norm, rel=1e-4), f"step {step}"
    assert losses[-1] < losses[0]


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_lora_finetune_on_every_linear_layer_trains_the_experts_and_exports_for_peft(
        train_assets, sparse_moe_checkpoint, tmp_path):
    """NeMo's default LoRA (every linear layer) on an MoE: the routed experts get adapters, they
    train, the PEFT export on transformers' model gives the merged export's logits, and the merged
    experts are W + s·B A expert by expert; `shoal generate` computes the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shoal.generate.load import load_for_generation

    hf_dir, ckpt = sparse_moe_checkpoint
    rank, alpha = 4, 8
    args = moe_args(train_assets, ckpt, "finetune", tmp_path / "res", "ft", "--max_steps", 3, "--peft", "lora",
                    f"--peft.rank={rank}", f"--peft.alpha={alpha}", "--train.lr=1e-2", "--peft.target_modules=all-linear")
    assert shoal(*args) == 0
    (final,) = (tmp_path / "res" / "ft" / "checkpoints").glob("step=000003*-last")
    tuned = read_dcp(final / "model", tmp_path / "tuned.pt")
    assert all(".lora" in k for k in tuned), sorted(k for k in tuned if ".lora" not in k)  # adapter-only
    for layer in range(3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            b = tuned[f"model.layers.{layer}.mlp.experts.lora.{proj}.lora_B.weight"]
            assert b.shape[0] == MOE_SHAPE["num_experts"] and b.abs().max() > 0, (layer, proj)  # it trained

    assert shoal("export", "--source", tmp_path / "res" / "ft", "--output_path", tmp_path / "merged") == 0
    assert shoal("export", "--source", final, "--output_path", tmp_path / "adapter", "--adapter_only") == 0
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        base_experts = [layer.mlp.experts.state_dict() for layer in base.model.layers]
        base_logits = base(input_ids=tokens).logits
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=tokens).logits
        merged_logits = merged(input_ids=tokens).logits
    assert (merged_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(merged_logits, peft_logits, rtol=0, atol=2e-5)
    with torch.no_grad():  # `shoal generate`'s model: adapters merged in memory
        in_memory = load_for_generation(final, device="cpu", dtype="float32").model(tokens)
    torch.testing.assert_close(in_memory, merged_logits, rtol=0, atol=2e-5)
    scaling = alpha / rank
    for layer in range(3):
        lora = {name: tuned[f"model.layers.{layer}.mlp.experts.lora.{name}"] for name in (
            "gate_proj.lora_A.weight", "gate_proj.lora_B.weight", "up_proj.lora_A.weight", "up_proj.lora_B.weight",
            "down_proj.lora_A.weight", "down_proj.lora_B.weight")}
        delta = {proj: scaling * lora[f"{proj}.lora_B.weight"] @ lora[f"{proj}.lora_A.weight"]
                 for proj in ("gate_proj", "up_proj", "down_proj")}
        expected_gate_up = base_experts[layer]["gate_up_proj"] + torch.cat([delta["gate_proj"], delta["up_proj"]], 1)
        got = merged.model.layers[layer].mlp.experts
        torch.testing.assert_close(got.gate_up_proj, expected_gate_up, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.down_proj, base_experts[layer]["down_proj"] + delta["down_proj"],
                                   rtol=0, atol=1e-6)


def test_lora_finetune_adapts_attention_and_leaves_experts_untouched(train_assets, moe_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = moe_checkpoint
    args = moe_args(train_assets, ckpt, "finetune", tmp_path / "res", "ft", "--max_steps", 2, "--peft", "lora",
                    "--peft.rank=4", "--peft.alpha=8", "--train.lr=1e-2", f"--peft.target_modules=[{','.join(ATTENTION)}]")
    assert shoal(*args) == 0
    (final,) = (tmp_path / "res" / "ft" / "checkpoints").glob("step=000002*-last")
    start = read_dcp(ckpt / "model", tmp_path / "start.pt")
    tuned = read_dcp(final / "model", tmp_path / "tuned.pt")
    adapted = {k.split(".lora_")[0] for k in tuned if ".lora_" in k}
    assert adapted == {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ATTENTION}
    # An adapter-only checkpoint: only what trains is saved (the experts and the rest of the base
    # are the start checkpoint's, named by shoal.json), so nothing but adapters may be in it.
    assert all(".lora_" in k for k in tuned), sorted(k for k in tuned if ".lora_" not in k)
    assert not set(tuned) & set(start)

    assert shoal("export", "--source", tmp_path / "res" / "ft", "--output_path", tmp_path / "merged") == 0
    assert shoal("export", "--source", final, "--output_path", tmp_path / "adapter", "--adapter_only") == 0
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        base_logits = base(input_ids=tokens).logits
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=tokens).logits
        merged_logits = merged(input_ids=tokens).logits
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(merged_logits, peft_logits, rtol=0, atol=2e-5)
    for index in (0, 2):  # the merge leaves routers and experts as they were, bit for bit
        for name, tensor in merged.model.layers[index].mlp.state_dict().items():
            assert torch.equal(tensor, base.model.layers[index].mlp.state_dict()[name]), (index, name)


SEED_MOE_PRETRAIN = [
    "pretrain", "--executor", "local", "--experiment", "qwen3_pretraining", "--num_nodes", "1", "--num_gpus", "8",
    "--model", "qwen3_30b_a3b", "--hf_model_id", "Qwen/Qwen3-30B-A3B", "--max_steps", "100",
    "--global_batch_size", "2048", "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "1",
    "--context_parallel_size", "1",
    "--nemo_model", "nemo_ckpt/Qwen3-30B-A3B", "--dataset_path", "data/custom_dataset/preprocessed/",
]


@pytest.fixture(scope="module")
def seed_moe_world(tmp_path_factory, train_assets: TrainAssets) -> Path:
    """An "imported Qwen3-30B-A3B": its shoal.json and a tokenizer (a dry run reads no weights)."""
    return write_seed_world(tmp_path_factory.mktemp("seed_moe"), "qwen3_30b_a3b", "Qwen3-30B-A3B", train_assets)


def test_seed_command_line_with_qwen3_30b_a3b_resolves(seed_moe_world, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(seed_moe_world)
    assert shoal(*SEED_MOE_PRETRAIN, "--dryrun") == 0
    out = capsys.readouterr().out
    recipe = yaml.safe_load(out.split("# what would run")[0])
    assert recipe["model"]["preset"] == "qwen3_30b_a3b"
    assert recipe["train"]["lr"] == 1e-5 and recipe["train"]["global_batch_size"] == 2048
    assert recipe["parallel"]["tensor_model_parallel_size"] == 2  # the flag wins over the recipe's 1
    assert "model: qwen3_moe, 30.53B parameters (3.35B active: 8 of 128 experts per token), 48 layers" in out


def test_pipeline_parallel_moe_is_refused_clearly(seed_moe_world, monkeypatch, capsys):
    monkeypatch.chdir(seed_moe_world)
    argv = list(SEED_MOE_PRETRAIN)
    argv[argv.index("--pipeline_model_parallel_size") + 1] = "2"
    assert shoal(*argv, "--dryrun") != 0
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and "pipeline_model_parallel_size 2" in err
    assert not (seed_moe_world / "results").exists()


def test_full_finetune_on_packed_data_trains_routers_and_experts(train_assets, moe_checkpoint, tmp_path):
    """Full fine-tuning (no adapters) on packed instruction data: the aux loss is logged, routers and
    experts change, and the export loads in transformers."""
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = moe_checkpoint
    assert shoal(*moe_args(train_assets, ckpt, "finetune", tmp_path / "res", "full", "--max_steps", 2,
                           "--train.lr=1e-3")) == 0
    records = train_records(tmp_path / "res" / "full")
    assert all(records[s]["aux_loss"] > 0 and records[s]["expert_load_max"] >= 1 for s in (1, 2))
    assert shoal("export", "--source", tmp_path / "res" / "full", "--output_path", tmp_path / "out") == 0
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for name in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        assert not torch.equal(tuned.model.layers[0].state_dict()[name], base.model.layers[0].state_dict()[name])
