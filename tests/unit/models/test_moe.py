"""shoal's Qwen3-MoE against Hugging Face `transformers` (the oracle) on CPU, in fp32.

A tiny `Qwen3MoeForCausalLM` made and saved by `transformers` is imported with `shoal import`;
shoal's logits, loss, load-balancing loss and gradients must equal transformers' (its
`output_router_logits=True` gives the aux loss, `loss` then includes `router_aux_loss_coef` · aux).
Layouts of sparse and dense layers (`mlp_only_layers`, `decoder_sparse_step`) and both
`norm_topk_prob` settings are covered. The preset is checked against Qwen3-30B-A3B's published
sizes (30.5B parameters, 3.3B active).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shoal.checkpoint.format import read_model_config  # noqa: E402
from shoal.checkpoint.state import load_model_into  # noqa: E402
from shoal.cli import main as shoal  # noqa: E402
from shoal.errors import ShoalError  # noqa: E402
from shoal.models import build_model, from_hf_config, get_preset  # noqa: E402
from shoal.models.moe import MoE  # noqa: E402
from tests.helpers.hf_moe import VOCAB_SIZE, save_hf_moe

torch.set_num_threads(1)

LAYOUTS = {
    "all_sparse": dict(norm_topk_prob=True),
    "mlp_only_layers": dict(mlp_only_layers=[1], norm_topk_prob=False),
    "sparse_step_2": dict(decoder_sparse_step=2, norm_topk_prob=True),
}


def imported(tmp_path: Path, **overrides):
    """(the transformers model, shoal's model built from `shoal import` of its save_pretrained)."""
    hf = save_hf_moe(tmp_path / "hf", **overrides)
    assert shoal(["import", "--source", str(tmp_path / "hf"), "--output_path", str(tmp_path / "ckpt")]) == 0
    model = build_model(read_model_config(tmp_path / "ckpt"), init=False)
    load_model_into(model, tmp_path / "ckpt")
    return hf, model


def batch(seed: int = 1, shape=(2, 40)) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_loss_and_aux_loss_match_transformers(tmp_path, layout):
    hf, ours = imported(tmp_path, **LAYOUTS[layout])
    ours.eval()
    tokens = batch()
    with torch.no_grad():
        expected = hf(input_ids=tokens, labels=tokens, output_router_logits=True)
        logits = ours(tokens)
        aux = ours.aux_loss()
    sparse = [i for i, layer in ours.model.layers.items() if isinstance(layer.mlp, MoE)]
    hf_sparse = [str(i) for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert sparse == hf_sparse and 0 < len(sparse) <= 3
    assert (logits - expected.logits).abs().max().item() <= 1e-5
    # transformers' loss: mean next-token CE + coef · aux; shift labels as it does.
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert aux.item() == pytest.approx(expected.aux_loss.item(), rel=1e-6, abs=1e-7)
    coef = hf.config.router_aux_loss_coef
    assert (ce + coef * aux).item() == pytest.approx(expected.loss.item(), rel=1e-6)


def test_gradients_of_loss_plus_aux_match_transformers(tmp_path):
    """Backward through the router (both through the routing weights and the aux loss) and the
    grouped experts gives transformers' gradients, expert by expert."""
    hf, ours = imported(tmp_path, **LAYOUTS["all_sparse"])
    hf.train()
    ours.train()
    tokens = batch(2)
    hf(input_ids=tokens, labels=tokens, output_router_logits=True).loss.backward()
    logits = ours(tokens)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    (ce + hf.config.router_aux_loss_coef * ours.aux_loss()).backward()

    i = hf.config.moe_intermediate_size
    for index in range(hf.config.num_hidden_layers):
        theirs, mine = hf.model.layers[index].mlp, ours.model.layers[str(index)].mlp
        gate_up = theirs.experts.gate_up_proj.grad  # transformers 5 fuses gate and up in memory: [X, 2I, E]
        torch.testing.assert_close(mine.experts.gate_proj.grad, gate_up[:, :i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mine.experts.up_proj.grad, gate_up[:, i:], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mine.experts.down_proj.grad, theirs.experts.down_proj.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mine.gate.weight.grad, theirs.gate.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.model.embed_tokens.weight.grad, hf.model.embed_tokens.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_aux_loss_gradient_reaches_the_router(tmp_path):
    """The aux loss alone has a gradient on the routers (through the softmax probabilities), none
    on the last layer's experts, whose outputs no router sees: the counts carry no gradient, as in
    transformers."""
    _, ours = imported(tmp_path, **LAYOUTS["all_sparse"])
    ours.train()
    ours(batch(3))
    ours.aux_loss().backward()
    layers = ours.model.layers
    assert all(layer.mlp.gate.weight.grad.abs().sum() > 0 for layer in layers.values())
    assert layers["2"].mlp.experts.gate_proj.grad is None
    assert layers["0"].mlp.experts.gate_proj.grad.abs().sum() > 0  # it feeds layer 1's router


def test_bad_moe_configs_are_refused():
    base = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16)
    assert from_hf_config(base).num_experts == 4
    # transformers 5's save_pretrained writes num_local_experts
    local = {k: v for k, v in base.items() if k != "num_experts"} | {"num_local_experts": 4}
    assert from_hf_config(local).num_experts == 4
    with pytest.raises(ShoalError, match="attention_bias"):
        from_hf_config({**base, "attention_bias": True}, where="x/config.json")
    with pytest.raises(ShoalError, match="num_experts_per_tok"):
        from_hf_config({**base, "num_experts_per_tok": 5})
    with pytest.raises(ShoalError, match=r"mlp_only_layers \[7\]"):
        from_hf_config({**base, "mlp_only_layers": [7]})
    with pytest.raises(ShoalError, match="decoder_sparse_step"):
        from_hf_config({**base, "decoder_sparse_step": 0})


def test_qwen3_30b_a3b_preset_has_the_published_sizes():
    cfg = get_preset("qwen3_30b_a3b")
    assert cfg.num_params / 1e9 == pytest.approx(30.5, abs=0.05)  # "30.5B in total"
    assert cfg.num_active_params / 1e9 == pytest.approx(3.3, abs=0.06)  # "3.3B activated"
    assert (cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (48, 128, 8, 768)
    # MFU counts the active parameters only
    assert cfg.flops_per_token(0) == 6 * cfg.num_active_params


def test_tiny_flavor_builds_and_counts_its_parameters():
    cfg = get_preset("qwen3_moe_tiny")
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params
    assert all(isinstance(layer.mlp, MoE) for layer in model.model.layers.values())


def test_logits_match_transformers_bf16(tmp_path):
    """bf16 end to end (the router's softmax still in fp32 on both sides): within bf16 rounding."""
    hf, ours = imported(tmp_path, **LAYOUTS["mlp_only_layers"])
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16).eval()
    tokens = batch(4, (1, 32))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits.float()
        got = ours(tokens).float()
    assert (got - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_rows_are_sorted_by_expert_without_a_data_dependent_shape():
    """`sort_by_expert` must trace with every size known: `torch.bincount`'s output size depends on
    the data, so compiled code carries an unbacked size at every MoE layer and, on a GPU, waits for
    the device to find it (its CUDA kernel reads the largest index back). Oracles: the shapes
    Dynamo traced, and a per-expert count and a stable sort written out here."""
    from shoal.models.moe import sort_by_expert

    traced_shapes = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "output":
                traced_shapes.extend(tuple(v.meta["example_value"].shape) for v in node.args[0])
        return gm

    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 6, (10, 2), generator=g)  # experts 6 and 7 of 8 get no row
    order, token_of_slot, counts = torch.compile(sort_by_expert, fullgraph=True, backend=record)(indices, 8)
    assert traced_shapes and all(isinstance(d, int) for shape in traced_shapes for d in shape), traced_shapes
    flat = indices.reshape(-1).tolist()
    expected_order = sorted(range(len(flat)), key=lambda slot: (flat[slot], slot))
    assert order.tolist() == expected_order
    assert token_of_slot.tolist() == [slot // 2 for slot in expected_order]
    assert counts.tolist() == [flat.count(x) for x in range(8)] and counts.dtype == torch.int64
