"""FP8 across processes trains like FP8 in one process: same losses and gradient norms.

torchao's FP8 casts run on the CPU in its emulation mode (`Float8LinearConfig.emulate`: the same
scales and FP8 rounding, the matmul in fp32), so a 2-rank gloo run of shoal's engine can be held
against the one-process engine with the same FP8 recipe. Under tensor parallelism the layers are
DTensors: torchao takes a tensorwise scale over the whole (all ranks') weight, so a sharded run
must give the one-process numbers to reordered-sum precision (rtol 1e-5); a rank scaling by its own
shard, or a layer left in high precision, moves them by 1e-4 or more (checked below: the FP8 run
itself differs from the same run without FP8 by more than ten times the tolerance).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shoal.checkpoint.training import CheckpointRecord, Progress, save_training_checkpoint
from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import build_mesh
from shoal.peft.config import LoraConfig
from shoal.train.engine import build_engine
from tests.helpers.distributed import run_distributed
from tests.helpers.distributed_workers import GLOBAL_BATCH, STEPS, make_batch, model_config

pytest.importorskip("torchao")

RTOL = 1e-5
# AdamW's first steps move a weight by about ±lr whatever its gradient's size, so a gradient that is
# ~0 on one side and ~0 of the other sign on the other (reordered sums) moves it 2·lr apart; FP8
# rounds the next forward's weights to 3 mantissa bits, which turns such a difference at lr 1e-3
# into a 2e-5 loss gap by step 3 (measured: exact to 3e-7 at lr 0 and 1e-4, with or without TP).
FP8_LR = 1e-4
# Steps a tensorwise run under tensor or data parallelism is held to to 1e-5 (see CASES).
TENSORWISE_STEPS = 2


@contextlib.contextmanager
def emulated_float8_on_cpu():
    """While an engine is built: torchao's CPU emulation, no device check, and every linear of the
    tiny model worth converting (the real filter would keep 64-wide layers in bf16). Put back after,
    so nothing leaks into other tests of the same process."""
    from shoal.distributed import float8

    saved = {name: getattr(float8, name) for name in ("float8_config", "check_float8_device", "worth_float8")}
    float8.float8_config = lambda plan: dataclasses.replace(saved["float8_config"](plan), emulate=True)
    float8.check_float8_device = lambda device: None
    float8.worth_float8 = lambda in_features, out_features, recipe: in_features % 16 == 0 and out_features % 16 == 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(float8, name, value)


@contextlib.contextmanager
def float8_gathers_over_gloo():
    """gloo has no float8 type: while inside, torchao's FP8 all-gather (tensor parallelism's, with
    its FP8 styles) sends the same bytes as uint8, as NCCL sends float8 itself. Yields the list of
    every FP8 gather's byte count."""
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    op = torch.ops._c10d_functional.all_gather_into_tensor.default
    saved, gathered = FLOAT8_OPS_TABLE[op], []

    def as_bytes(aten_op, args, kwargs=None):
        fp8 = args[0]
        data = fp8._data.contiguous()
        gathered.append(data.numel())
        out = aten_op(data.view(torch.uint8), *args[1:], **(kwargs or {})).view(data.dtype)
        return Float8TrainingTensor(out, fp8._scale, fp8._orig_dtype, fp8._linear_mm_config, fp8._gemm_input_role)

    FLOAT8_OPS_TABLE[op] = as_bytes
    try:
        yield gathered
    finally:
        FLOAT8_OPS_TABLE[op] = saved


def build(spec: dict, start: Path | None, fp8: bool = True):
    world = dist.get_world_size() if dist.is_initialized() else 1
    parallel = ParallelConfig(**(spec["parallel"] if world > 1 else {}))
    micro_batches = spec.get("pipeline_micro_batches", 1)  # the schedule's, under pipelining
    train = TrainSection(micro_batch_size=GLOBAL_BATCH // micro_batches, global_batch_size=GLOBAL_BATCH, lr=FP8_LR,
                         fp8="hybrid" if fp8 else None, fp8_recipe=spec["recipe"] if fp8 else None)
    peft = None
    if spec.get("peft"):
        peft = LoraConfig(rank=8, alpha=16.0, target_modules=("all-linear",), use_dora=spec["peft"] == "dora")
    with emulated_float8_on_cpu():
        return build_engine(model_config(), train=train, parallel=parallel, peft=peft,
                            dims=build_mesh(parallel, world, "cpu"), device=torch.device("cpu"),
                            compute_dtype=torch.float32, start=start, micro_batches_per_step=micro_batches)


def fp8_steps(spec: dict, start: str, fp8: bool = True, lr: float = FP8_LR, data_parallel: int = 1) -> dict:
    """STEPS optimizer steps of the engine as `shoal pretrain/finetune` builds it; losses, gradient
    norms, and how many layers compute in FP8. `data_parallel`: in one process, the data-parallel
    ranks of the layout it stands for."""
    from torchao.float8.float8_linear import Float8Linear

    from shoal.distributed.float8 import FrozenFloat8Linear

    engine = build(spec, Path(start), fp8)
    in_fp8 = sum(isinstance(m, Float8Linear) or isinstance(getattr(m, "base_linear", None), FrozenFloat8Linear)
                 for part in engine.parts for m in part.modules())
    losses, norms = [], []
    dims = engine.dims
    # Data parallelism: each rank takes its rows (tensor-parallel ranks share them); one process takes
    # the same rows as as many micro-batches. FP8 scales an activation by its own amax, so the oracle
    # must see the same pieces: a whole-batch amax would differ from each rank's.
    pieces = dims.dp_size if dims.dp_enabled else data_parallel
    rows = GLOBAL_BATCH // pieces
    mine = [dims.dp_rank] if dims.dp_enabled else range(pieces)
    with float8_gathers_over_gloo() as gathered:
        for step in range(spec.get("steps", STEPS)):
            full = make_batch(step, model_config(), documents=False)
            mbs = [engine.prepare_on_host({k: v[i * rows:(i + 1) * rows] for k, v in full.items()}) for i in mine]
            tokens = float(full["loss_mask"].sum())
            losses.append(dims.all_reduce_over_batch(engine.forward_backward(mbs, tokens)).item() / tokens)
            norms.append(float(engine.clip_and_step(1.0, lr)))
    return {"losses": losses, "grad_norms": norms, "in_fp8": in_fp8, "stage": dims.pp_rank,
            "float8_gathers": len(gathered)}


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initial weights every run loads (an initialisation could depend on the layout)."""
    engine = build({"parallel": {}, "recipe": None}, None, fp8=False)
    root = tmp_path_factory.mktemp("fp8_tp_start")
    return save_training_checkpoint(root, engine.parts, None, Progress(0), CheckpointRecord(model_config()),
                                    max_steps=1, val_loss=None, save_top_k=1)


CASES = {
    # gathers_in_float8: the sequence-parallel gathers carry FP8 (torchao's FP8 styles; tensorwise).
    # Tensorwise under TP for two steps: the third step's weights differ by reordered sums, which
    # tensorwise FP8 can round apart (torch 2.11: the third gradient norm 1.1e-3 off; 2.13 matches;
    # the rounding-flip test below shows the mechanism).
    "tensorwise_tp2_sp": {"parallel": {"tensor_model_parallel_size": 2}, "recipe": "tensorwise",
                          "gathers_in_float8": True, "steps": TENSORWISE_STEPS},
    "rowwise_tp2_no_sp": {"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": False},
                          "recipe": "rowwise"},
    "lora_tensorwise_tp2_sp": {"parallel": {"tensor_model_parallel_size": 2}, "recipe": "tensorwise", "peft": "lora"},
    "dora_rowwise_with_gw_hp_tp2_sp": {"parallel": {"tensor_model_parallel_size": 2}, "recipe": "rowwise_with_gw_hp",
                                       "peft": "dora"},
    # FSDP2 with FP8 all-gather (tensorwise); tensor and data parallelism together with a rowwise
    # recipe (tensorwise there: the test after this one).
    "tensorwise_fsdp2": {"parallel": {}, "recipe": "tensorwise", "data_parallel": 2},
    "rowwise_tp2_fsdp2": {"parallel": {"tensor_model_parallel_size": 2}, "recipe": "rowwise", "world": 4,
                          "data_parallel": 2},
    "lora_rowwise_tp2_replicate2": {"parallel": {"tensor_model_parallel_size": 2, "data_parallel_replicate_size": 2},
                                    "recipe": "rowwise", "peft": "lora", "world": 4, "data_parallel": 2},
    # Pipelining: each stage computes what one process does, on the schedule's micro-batches.
    "tensorwise_pp2": {"parallel": {"pipeline_model_parallel_size": 2}, "recipe": "tensorwise",
                       "pipeline_micro_batches": 2, "data_parallel": 2},
    "lora_rowwise_tp2_pp2": {"parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
                             "recipe": "rowwise", "peft": "lora", "world": 4, "pipeline_micro_batches": 2,
                             "data_parallel": 2},
    # Context parallelism: a rank holds part of each sequence, so a scale over tokens is its own part's
    # (as under data parallelism); rowwise_with_gw_hp scales only per token (row) and computes the
    # weight gradient in high precision, so it must give one process's numbers. Full training for
    # one step only: the weight gradients are summed over the context-parallel ranks, and weights
    # that differ by such a reordered sum (1e-7) are rounded apart by FP8 from the next step on,
    # as one process's own weights would be (docs/training.md); a frozen base does not move.
    "rowwise_with_gw_hp_cp2_one_step": {"parallel": {"context_parallel_size": 2}, "recipe": "rowwise_with_gw_hp",
                                        "steps": 1},
    "lora_rowwise_with_gw_hp_cp2": {"parallel": {"context_parallel_size": 2}, "recipe": "rowwise_with_gw_hp",
                                    "peft": "lora"},
    "dora_rowwise_with_gw_hp_tp2_cp2": {"parallel": {"tensor_model_parallel_size": 2, "context_parallel_size": 2},
                                        "recipe": "rowwise_with_gw_hp", "peft": "dora", "world": 4},
}


@pytest.mark.parametrize("name", CASES)
def test_float8_under_tensor_parallel_matches_one_process(name: str, start: Path):
    spec = CASES[name]
    one = fp8_steps(spec, str(start), data_parallel=spec.get("data_parallel", 1))
    ranks = run_distributed(fp8_steps, spec.get("world", 2), spec, str(start))
    assert sum({r["stage"]: r["in_fp8"] for r in ranks}.values()) == one["in_fp8"] > 0
    assert (ranks[0]["float8_gathers"] > 0) == spec.get("gathers_in_float8", False)
    for got in ranks:
        torch.testing.assert_close(got["losses"], one["losses"], rtol=RTOL, atol=0)
        torch.testing.assert_close(got["grad_norms"], one["grad_norms"], rtol=RTOL, atol=0)
    # The comparison can see FP8: the same run in high precision lands farther off than the tolerance.
    plain = fp8_steps(spec, str(start), fp8=False, data_parallel=spec.get("data_parallel", 1))
    assert max(abs(a / b - 1) for a, b in zip(plain["grad_norms"], one["grad_norms"])) > 10 * RTOL


ALONGSIDE_TENSOR_PARALLEL = {
    "fsdp2": {},  # FP8 all-gather of the tensor-parallel shards
    "pp2": {"pipeline_model_parallel_size": 2},
}


@pytest.mark.parametrize("other", ALONGSIDE_TENSOR_PARALLEL)
def test_float8_tensorwise_under_tensor_parallel_and_more_matches_tensor_parallel_alone(other: str, start: Path):
    """TP2 × FSDP2 (FP8 all-gather) or TP2 × PP2 against TP2 alone taking the same micro-batches
    (the data-parallel ranks' rows, the schedule's micro-batches). Against one process, tensorwise
    under tensor parallelism gives the same losses but, on some batches (these among them),
    first-layer gradients up to a few % off: an E5M2 rounding flipped by a reordered sum, then
    inherited (the test after this one). What the other dimension adds must be nothing."""
    extra = ALONGSIDE_TENSOR_PARALLEL[other]
    spec = {"parallel": {"tensor_model_parallel_size": 2}, "recipe": "tensorwise", "steps": TENSORWISE_STEPS}
    alone = run_distributed(fp8_steps, 2, spec, str(start), True, FP8_LR, 2)
    spec = {**spec, "parallel": {**spec["parallel"], **extra}}
    if extra.get("pipeline_model_parallel_size"):
        spec["pipeline_micro_batches"] = 2
    both = run_distributed(fp8_steps, 4, spec, str(start), True, FP8_LR, 2)
    assert sum({r["stage"]: r["in_fp8"] for r in both}.values()) == alone[0]["in_fp8"] > 0
    assert alone[0]["float8_gathers"] > 0 and all(r["float8_gathers"] > 0 for r in both)
    for got in both:
        torch.testing.assert_close(got["losses"], alone[0]["losses"], rtol=RTOL, atol=0)
        torch.testing.assert_close(got["grad_norms"], alone[0]["grad_norms"], rtol=RTOL, atol=0)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def recorded_float8_casts(spec: dict, start: str) -> list[dict]:
    """Every FP8 cast of one step (forward and backward, two micro-batches), in order: its role, its
    scale, the FP8 codes and the high-precision tensor cast, each whole (gathered over TP ranks)."""
    import torchao.float8.float8_linear as float8_linear
    from torch.distributed.tensor import DTensor

    cast = float8_linear.hp_tensor_to_float8_dynamic
    casts = []

    def recording(hp, *args, **kwargs):
        out = cast(hp, *args, **kwargs)
        local = out.to_local() if isinstance(out, DTensor) else out
        codes = local._data.view(torch.uint8).float()  # gloo does not carry float8
        if isinstance(out, DTensor):
            codes = DTensor.from_local(codes, out.device_mesh, out.placements, run_check=False)
        casts.append({"role": str(kwargs.get("gemm_input_role", args[2] if len(args) > 2 else None)),
                      "scale": float(local._scale), "codes": _whole(codes).to(torch.uint8),
                      "hp": _whole(hp).detach().float().clone()})
        return out

    # The plain tensor-parallel styles, so that each cast happens where one process makes it (the FP8
    # styles cast a layer's input once before gathering it, and equal one process's numbers: the
    # layout cases above).
    from shoal.distributed import float8

    saved, float8.gathers_in_float8 = float8.gathers_in_float8, lambda layers: False
    try:
        engine = build(spec, Path(start))
    finally:
        float8.gathers_in_float8 = saved
    float8_linear.hp_tensor_to_float8_dynamic = recording
    try:
        full = make_batch(0, model_config(), documents=False)
        rows = GLOBAL_BATCH // 2
        mbs = [engine.prepare_on_host({k: v[i * rows:(i + 1) * rows] for k, v in full.items()}) for i in range(2)]
        engine.forward_backward(mbs, float(full["loss_mask"].sum()))
    finally:
        float8_linear.hp_tensor_to_float8_dynamic = cast
    return casts


def test_float8_tensorwise_under_tensor_parallel_departs_from_one_process_by_a_rounding_flip(start: Path):
    """Why tensorwise under TP gives one process's losses but gradients a few % off (the 4-row
    micro-batches above; the rowwise recipes match): each FP8 cast of a TP2 step against the same
    cast in one process. Every scale agrees to fp32 rounding; the casts agree code for code until
    one whose high-precision input differs only by reordered sums (< 1e-6) rounds a few elements to
    the neighbouring FP8 code. E5M2 gradients have two mantissa bits, so such a flip moves an element
    by 12-25%, and the next casts inherit it (measured: 1 element of layer 1's o_proj output
    gradient, then 58 of the v_proj's after attention, then hundreds): FP8 noise, not a scale."""
    spec = {"parallel": {"tensor_model_parallel_size": 2}, "recipe": "tensorwise"}
    one = recorded_float8_casts(spec, str(start))
    tp = run_distributed(recorded_float8_casts, 2, spec, str(start))[0]
    assert [(c["role"], c["hp"].shape) for c in tp] == [(c["role"], c["hp"].shape) for c in one]
    for a, b in zip(tp, one):
        assert a["scale"] == pytest.approx(b["scale"], rel=1e-6, abs=0)
    differing = [i for i, (a, b) in enumerate(zip(tp, one)) if not torch.equal(a["codes"], b["codes"])]
    if not differing:  # code for code equal: no gap at all on this build
        return
    first_tp, first_one = tp[differing[0]], one[differing[0]]
    assert (first_tp["hp"] - first_one["hp"]).norm() / first_one["hp"].norm() < 1e-6
    flipped = first_tp["codes"] != first_one["codes"]
    assert 0 < int(flipped.sum()) <= 4
    # Neighbouring codes of the same sign: one rounding step apart.
    steps = first_tp["codes"][flipped].int() - first_one["codes"][flipped].int()
    assert bool((steps.abs() == 1).all())
