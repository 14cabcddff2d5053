"""Without FSDP, a LoRA/DoRA run keeps its frozen base in the compute dtype and only adapters train.

The oracle is PEFT on the same Hugging Face model held in bf16 (what a PEFT user loads), its
adapters upcast to fp32 by PEFT itself, under the same `torch.autocast`: shoal's loss and adapter
gradients must match it within bf16 tolerance, and checkpoints keep fp32 as before.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import set_model_state_dict

from shoal.checkpoint.state import model_state
from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import build_mesh
from shoal.models.config import from_hf_config
from shoal.peft.config import LoraConfig
from shoal.train.engine import build_engine
from tests.helpers.hf_models import tiny_peft_hf
from tests.helpers.peft_twins import VOCAB, copy_adapters_to_peft, peft_adapter_params, randomize_adapters

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _engine(hf: torch.nn.Module, dora: bool, compute_dtype: torch.dtype):
    parallel = ParallelConfig()
    engine = build_engine(
        from_hf_config(hf.config.to_dict()), train=TrainSection(micro_batch_size=2, global_batch_size=2),
        parallel=parallel, peft=LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS, use_dora=dora),
        dims=build_mesh(parallel, 1, "cpu"), device=torch.device("cpu"), compute_dtype=compute_dtype,
    )
    missing, unexpected = engine.parts[0].load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    return engine


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=gen)
    mask = (torch.rand(2, 16, generator=gen) > 0.3).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(16).expand(2, 16)}


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_frozen_base_in_bf16_matches_peft_on_a_bf16_model(family, dora):
    hf = tiny_peft_hf(family)
    engine = _engine(hf, dora, torch.bfloat16)
    model = engine.parts[0]
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name
        assert param.requires_grad == ("lora_" in name), name
    if family == "llama_tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    optimized = {id(p) for opt in engine.optimizers for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if "lora_" in n}

    theirs = peft.get_peft_model(copy.deepcopy(hf).to(torch.bfloat16), peft.LoraConfig(
        r=4, lora_alpha=8.0, target_modules=TARGETS, use_dora=dora))
    randomize_adapters(model)
    copy_adapters_to_peft(model, theirs)
    assert all(p.dtype == torch.float32 for p in peft_adapter_params(theirs).values())  # PEFT's own upcast

    batch = _batch()
    tokens = float(batch["loss_mask"].sum())
    ours = engine.forward_backward([batch], tokens) / tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = theirs(input_ids=batch["tokens"]).logits
    losses = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
    reference = (losses * batch["loss_mask"].flatten()).sum() / tokens
    reference.backward()
    torch.testing.assert_close(ours, reference.detach(), atol=2e-2, rtol=1e-2)
    theirs_params = peft_adapter_params(theirs)
    for name, param in model.named_parameters():
        if "lora_" in name:
            expected = theirs_params[name].grad
            assert (param.grad - expected).norm() <= 0.05 * expected.norm() + 1e-6, name


def test_checkpoint_state_keeps_fp32_and_loads_back():
    hf = tiny_peft_hf("llama")
    engine = _engine(hf, dora=True, compute_dtype=torch.bfloat16)
    state = model_state(engine.parts[0])
    assert all(t.dtype == torch.float32 for t in state.values())
    # A bf16-held weight upcast is exact: the saved value is the HF weight rounded to bf16.
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(state[name], hf.state_dict()[name].to(torch.bfloat16).float(), atol=0, rtol=0)
    # Loading a state (as a resume does) goes through those fp32 copies back into bf16 parameters.
    fresh = _engine(tiny_peft_hf("llama", seed=5), dora=True, compute_dtype=torch.bfloat16).parts[0]
    set_model_state_dict(fresh, state)  # how shoal.checkpoint.state.load_model_into applies a loaded state
    assert fresh.get_parameter(name).dtype == torch.bfloat16
    torch.testing.assert_close(fresh.get_parameter(name), engine.parts[0].get_parameter(name), atol=0, rtol=0)


def test_fp32_compute_and_full_training_keep_fp32():
    hf = tiny_peft_hf("llama")
    assert all(p.dtype == torch.float32 for p in _engine(hf, False, torch.float32).parts[0].parameters())
    parallel = ParallelConfig()
    full = build_engine(from_hf_config(hf.config.to_dict()), train=TrainSection(micro_batch_size=2, global_batch_size=2),
                        parallel=parallel, peft=None, dims=build_mesh(parallel, 1, "cpu"),
                        device=torch.device("cpu"), compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in full.parts[0].parameters())


def test_dora_output_keeps_the_compute_dtype():
    # The fp32 magnitude must not turn a bf16 layer's output into fp32 (flash attention takes
    # bf16 only, and the residual stream would double in size).
    engine = _engine(tiny_peft_hf("llama"), dora=True, compute_dtype=torch.bfloat16)
    layer = engine.parts[0].model.layers["0"].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def _tp_lora_loss(compute_dtype_name: str) -> dict:
    """One forward/backward of a LoRA engine under tensor parallelism alone (as the seed's TP2 runs)."""
    import torch.distributed as dist

    from shoal.models import get_preset

    dtype = getattr(torch, compute_dtype_name)
    tp = dist.get_world_size() if dist.is_initialized() else 1
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    engine = build_engine(
        get_preset("llama_tiny"), train=TrainSection(micro_batch_size=2, global_batch_size=2), parallel=parallel,
        peft=LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]),
        dims=build_mesh(parallel, tp, "cpu"), device=torch.device("cpu"), compute_dtype=dtype,
    )
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 512, (2, 17), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
             "position_ids": torch.arange(16).expand(2, 16)}
    loss = engine.forward_backward([batch], 32.0) / 32.0
    frozen = {str(p.dtype) for n, p in engine.parts[0].named_parameters() if "lora_" not in n}
    return {"loss": float(loss), "frozen": sorted(frozen)}


def test_tensor_parallel_lora_keeps_a_bf16_base_and_the_one_process_loss():
    from tests.helpers.distributed import run_distributed

    one = _tp_lora_loss("bfloat16")
    ranks = run_distributed(_tp_lora_loss, 2, "bfloat16")
    assert one["frozen"] == ["torch.bfloat16"] and all(r["frozen"] == ["torch.bfloat16"] for r in ranks)
    for r in ranks:
        assert abs(r["loss"] - one["loss"]) <= 2e-2 * abs(one["loss"])  # bf16 matmuls split over 2 ranks
