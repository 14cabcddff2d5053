"""FP8 on several GPUs (NCCL): the loss curve of each multi-GPU layout follows its own BF16 curve.

Run on a machine with 2 or more GPUs and torchao: `python -m pytest -m gpu tests/gpu/test_float8_multi_gpu.py`
(`bash bench/gpu_suite.sh fp8_multi` runs the throughput side). The CPU tests
(tests/distributed/test_float8_tensor_parallel.py) hold each layout's FP8 numbers against one
process in torchao's emulation; what only a GPU shows is the real FP8 matmuls and NCCL carrying
FP8 (FSDP2's weight all-gather, tensor parallelism's sequence-parallel gathers). The oracle is the
same layout in BF16 from the same weights on the same batches, judged as tests/gpu/test_float8_gpu.py
judges one GPU (its data, its 10-step means, its tolerances), compiled as the recipes run.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_float8_gpu import CFG, FINAL_GAP, MAX_GAP, MBS, SEQ, STEPS, batches, gaps, record, smoothed
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.gpu
pytest.importorskip("torchao")

LAYOUTS = {
    # FSDP2 with FP8 all-gather of the weights (tensorwise), each rank its half of the rows.
    "fsdp2": {},
    # Tensor parallelism with sequence parallelism: FP8 gathers of activations and output gradients.
    "tp2_sp": {"tensor_model_parallel_size": 2},
}


def layout_curve(parallel: dict, fp8: bool) -> dict:
    """STEPS compiled steps of the layout on 2 GPUs; the global loss per step."""
    import torch.distributed as dist

    from shoal.config.parallel import ParallelConfig
    from shoal.config.recipe import TrainSection
    from shoal.distributed import build_mesh
    from shoal.train.engine import build_engine

    config = ParallelConfig(compile=True, **parallel)
    dims = build_mesh(config, dist.get_world_size(), "cuda")
    torch.manual_seed(0)
    train = TrainSection(micro_batch_size=MBS // dims.dp_size, global_batch_size=MBS,
                         **({"fp8": "hybrid", "fp8_recipe": "tensorwise"} if fp8 else {}))
    engine = build_engine(CFG, train=train, parallel=config, peft=None, dims=dims, device=torch.device("cuda"),
                          compute_dtype=torch.bfloat16)
    rows = MBS // dims.dp_size
    mine = slice(dims.dp_rank * rows, (dims.dp_rank + 1) * rows) if dims.dp_enabled else slice(None)
    tokens = float(MBS * SEQ)
    losses = []
    for step, batch in enumerate(batches(STEPS)):
        loss = engine.forward_backward([{k: v[mine] for k, v in batch.items()}], tokens)
        engine.clip_and_step(1.0, 3e-4 * min(1.0, (step + 1) / 20))
        losses.append(dims.all_reduce_over_batch(loss.detach()).item() / tokens)
    return {"losses": losses, "fsdp_float8_all_gather": bool(engine.float8 and engine.float8.fsdp_float8_all_gather)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float8_layout_follows_its_bf16_curve(layout: str):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    bf16 = run_distributed(layout_curve, 2, LAYOUTS[layout], False, device_type="cuda", deadline_s=900)[0]
    fp8 = run_distributed(layout_curve, 2, LAYOUTS[layout], True, device_type="cuda", deadline_s=900)[0]
    record(f"{layout}_bf16", bf16["losses"])
    record(f"{layout}_fp8_tensorwise", fp8["losses"])
    assert fp8["fsdp_float8_all_gather"] == (layout == "fsdp2")
    assert smoothed(bf16["losses"])[-1] < 0.5 * smoothed(bf16["losses"])[0], "the BF16 run did not learn"
    worst, final = gaps(bf16["losses"], fp8["losses"])
    assert worst < MAX_GAP and final < FINAL_GAP
