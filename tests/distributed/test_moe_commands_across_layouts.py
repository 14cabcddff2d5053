"""`shoal pretrain` on a tiny Qwen3-MoE trains the same in every layout it supports.

As in test_commands_across_layouts.py: each run is the user's command in a child process
(`--num_gpus N` starts N gloo ranks under torchrun); the oracle is the same command in one
process. Besides loss and gradient norm, the load-balancing loss (`aux_loss`, which joins the
objective with a large coefficient here) and the router statistics must agree: they check that
the aux term is averaged over data-parallel ranks, not summed or taken per rank, and that tensor
parallel ranks route the whole sequence. A checkpoint written by FSDP2 resumes in one process.

Expert parallelism (`--expert_model_parallel_size 2`: 4 of the 8 experts per rank, tokens sent to
them by all-to-all) must give the same records too: routing stays on the rank that owns the tokens,
so the router statistics are each rank's counts over all experts, summed over the data-parallel
ranks as without expert parallelism. Its checkpoint (experts saved from two ranks' shards) resumes
in one process, and the one-process checkpoint resumes under expert parallelism.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.distributed.test_commands_across_layouts import RTOL, STEPS, ranks_that_ran, rewound_to_step_2, run_ok
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_dcp, train_args, train_records

MOE_SHAPE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                 norm_topk_prob=True, max_position_embeddings=256, router_aux_loss_coef=0.1)
KEYS = ("loss", "grad_norm", "aux_loss", "expert_load_max", "expert_load_min")
LAYOUTS = {"fsdp2": ["--num_gpus", "2"], "tp2_sp": ["--num_gpus", "2", "-T", "2"],
           "fsdp2_tp2": ["--num_gpus", "4", "-T", "2"], "ep2": ["--num_gpus", "2", "--expert_model_parallel_size", "2"],
           "ep2_tp2": ["--num_gpus", "4", "-T", "2", "--expert_model_parallel_size", "2"]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    """A tiny Qwen3-MoE with the demo tokenizer, imported with `shoal import`, and a corpus."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from shoal.demo.corpus import write_instruction_set, write_pretraining_corpus
    from shoal.demo.tiny_model import tiny_llama_config
    from shoal.demo.tokenizer import TOKENIZER_DIR

    root = tmp_path_factory.mktemp("moe_layout_assets")
    ids = tiny_llama_config()
    config = Qwen3MoeConfig(vocab_size=ids.vocab_size, bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id,
                            pad_token_id=ids.pad_token_id, **MOE_SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(config).float()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.5)
    model.save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "hf" / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    assert shoal("import", "--source", root / "hf", "--output_path", root / "ckpt") == 0
    write_pretraining_corpus(root / "corpus.jsonl", num_documents=200)
    assert shoal("preprocess", "--input", root / "corpus.jsonl", "--json-keys", "text", "--tokenizer", root / "ckpt",
                 "--output-prefix", root / "data" / "corpus", "--append-eod", "--workers", "1") == 0
    write_instruction_set(root / "sft", sizes=(48, 16, 16))
    return TrainAssets(root, root / "hf", root / "ckpt", root / "data", root / "sft")


SAVE_AT_2 = ["--checkpoint.save_interval=2", "--checkpoint.save_top_k=2"]


@pytest.fixture(scope="module")
def runs(assets: TrainAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_layout_runs")
    for name, layout in {"one_process": [], **LAYOUTS}.items():
        run_ok(train_args(assets, "pretrain", root, name, "--max_steps", STEPS, *SAVE_AT_2, *layout), root)
    return {name: root / name for name in ("one_process", *LAYOUTS)}


def assert_same_records(got: Path, expected: Path, steps: list[int]) -> None:
    mine, theirs = train_records(got), train_records(expected)
    for step in steps:
        for key in KEYS:
            assert math.isclose(mine[step][key], theirs[step][key], rel_tol=RTOL), \
                f"{got.name} step {step}: {key} {mine[step][key]!r} != {theirs[step][key]!r}"


@pytest.mark.parametrize("name", LAYOUTS)
def test_moe_pretrain_layout_matches_one_process(runs: dict[str, Path], name: str):
    assert ranks_that_ran(runs[name]) == set(range(int(LAYOUTS[name][1])))
    assert_same_records(runs[name], runs["one_process"], list(range(1, STEPS + 1)))


def test_moe_fsdp_checkpoint_resumes_in_one_process(assets: TrainAssets, runs: dict[str, Path]):
    """Steps 3-4 in one process from the FSDP2 run's step-2 checkpoint (grouped experts sharded
    over 2 ranks when saved, whole when loaded) continue the same curve."""
    root = runs["one_process"].parent
    exp = rewound_to_step_2(runs["fsdp2"], root / "resume_fsdp2")
    resumed = run_ok(train_args(assets, "pretrain", root, exp.name, "--max_steps", STEPS, *SAVE_AT_2), root)
    assert "from step=000002" in resumed.stdout + resumed.stderr
    assert_same_records(exp, runs["one_process"], [3, 4])


@pytest.mark.parametrize("source,layout", [
    pytest.param("ep2", [], id="ep2_to_one_process"),
    pytest.param("one_process", LAYOUTS["ep2"], id="one_process_to_ep2"),
])
def test_moe_checkpoint_reshards_between_expert_layouts(
    assets: TrainAssets, runs: dict[str, Path], source: str, layout: list[str]
):
    """Steps 3-4 resumed from `source`'s step-2 checkpoint in `layout`: the grouped [X, ...] experts
    (and their AdamW moments) saved whole or as two ranks' halves load into the other layout, and
    the curve continues as the uninterrupted one-process run's."""
    root = runs["one_process"].parent
    exp = rewound_to_step_2(runs[source], root / f"resume_{source}_in_{'ep2' if layout else 'one'}")
    resumed = run_ok(train_args(assets, "pretrain", root, exp.name, "--max_steps", STEPS, *SAVE_AT_2, *layout), root)
    assert "from step=000002" in resumed.stdout + resumed.stderr
    assert_same_records(exp, runs["one_process"], [3, 4])


@pytest.mark.parametrize("targets, layout", [
    pytest.param("[q_proj,k_proj,v_proj,o_proj]", "ep2", id="attention"),
    pytest.param("all-linear", "ep2", id="experts_too"),
    pytest.param("[q_proj,k_proj,v_proj,o_proj]", "ep2_fsdp2", id="attention_ep2_fsdp2"),
    pytest.param("all-linear", "ep2_fsdp2", id="experts_too_ep2_fsdp2"),
])
def test_moe_lora_finetune_under_expert_parallel_matches_one_process(assets: TrainAssets, tmp_path: Path,
                                                                     targets: str, layout: str):
    """`shoal finetune --peft lora` under EP2 follows the one-process run (loss, gradient norm, aux
    loss and router statistics), with adapters on the attention only (experts frozen and still
    dispatched by all-to-all, their FSDP units holding no trainable weight) or on every linear
    layer, the routed experts included (their adapters split over the ranks with the experts, and
    under EP2×FSDP2 sharded further over the two ranks holding the same experts)."""
    # EP2×FSDP2: 4 data-parallel ranks, so micro-batches of 1 (the same global batch of 4), in the
    # one-process run too: the aux loss is taken per micro-batch, so its gradient depends on them.
    micro = ["-m", "1"] if layout == "ep2_fsdp2" else []
    layouts = {"ep2": LAYOUTS["ep2"], "ep2_fsdp2": ["--num_gpus", "4", "--expert_model_parallel_size", "2"]}
    runs = {}
    for name, args in {"one_process": micro, layout: [*layouts[layout], *micro]}.items():
        run_ok(train_args(assets, "finetune", tmp_path, f"lora_{name}", "--max_steps", STEPS, "--peft", "lora",
                          f"--peft.target_modules={targets}", *args), tmp_path)
        runs[name] = tmp_path / f"lora_{name}"
    assert ranks_that_ran(runs[layout]) == set(range(int(layouts[layout][1])))
    (final,) = (runs["one_process"] / "checkpoints").glob("step=*-last")
    held = read_dcp(final / "model", tmp_path / "model.pt")
    expert_b = [t for k, t in held.items() if ".mlp.experts.lora." in k and k.endswith("lora_B.weight")]
    assert len(expert_b) == (0 if targets.startswith("[") else 3 * MOE_SHAPE["num_hidden_layers"])
    assert all(t.abs().max() > 0 for t in expert_b)  # they trained
    assert_same_records(runs[layout], runs["one_process"], list(range(1, STEPS + 1)))
