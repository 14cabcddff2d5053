"""How far apart two LoRA loss curves lie when only chance differs, against the BF16-FP8 gap.

tests/gpu/test_float8_gpu.py compares one FP8 (tensorwise) LoRA curve with one BF16 curve on its
random successor-chain data; this runs the same comparison on other data seeds and a BF16 curve
against a rerun of itself, so the test's tolerance can be read against the spread.
    python bench/float8_lora_gap_spread.py --seeds 0 1 2   (one GPU with torchao)"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.gpu import test_float8_gpu as t  # noqa: E402 - the test's model, data and gap measure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peft", default="lora")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        data = t.batches(t.LORA_STEPS, seed)
        base = t.train(t.make_engine(None, args.peft), data, t.LORA_STEPS, 1e-3)
        again = t.train(t.make_engine(None, args.peft), data, t.LORA_STEPS, 1e-3)
        fp8 = t.train(t.make_engine("tensorwise", args.peft), data, t.LORA_STEPS, 1e-3)
        row = {"seed": seed, "bf16_vs_bf16_rerun": t.gaps(base, again), "bf16_vs_fp8": t.gaps(base, fp8),
               "final_smoothed": {"bf16": t.smoothed(base)[-1], "rerun": t.smoothed(again)[-1],
                                  "fp8": t.smoothed(fp8)[-1]}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"float8_{args.peft}_gap_spread.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
