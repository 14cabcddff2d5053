"""Training metrics: a live progress line, `metrics.jsonl`, TensorBoard and Weights & Biases.

Only rank 0 writes. Throughput is tokens/s over the whole job and per GPU; MFU follows DESIGN §7:
tokens/s/GPU × (6N + 12·L·H·Dh·S) / peak, with the peak taken from the device's name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s by device name fragment (no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
# Dense FP8 (E4M3) peak, vendors' datasheets: twice bf16 on Hopper and Ada; Ampere has no FP8.
FP8_PEAK_FLOPS = {"H200": 1979e12, "H100": 1979e12, "L40S": 733e12}


def peak_flops(device: torch.device, fp8: bool = False) -> float | None:
    """The device's dense peak for bf16 matmuls, or with `fp8` for FP8 ones (None: unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = FP8_PEAK_FLOPS if fp8 else PEAK_FLOPS
    return next((v for k, v in table.items() if k in name), None)


def mfu_fields(tokens_per_s_per_gpu: float, flops_per_token: float, device: torch.device, fp8: bool) -> dict:
    """MFU against the bf16 peak ("mfu"), and for FP8 runs also against the FP8 peak ("mfu_fp8_peak").

    The FLOP count is the same for both (DESIGN §7): an FP8 run does the same arithmetic, only
    faster, so its bf16-peak MFU compares directly with a bf16 run's and may pass 100% in theory.
    """
    achieved = tokens_per_s_per_gpu * flops_per_token
    peak = peak_flops(device)
    fields = {"mfu": achieved / peak if peak else None}
    if fp8:
        peak8 = peak_flops(device, fp8=True)
        fields["mfu_fp8_peak"] = achieved / peak8 if peak8 else None
    return fields


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records past `after_step`: a resumed run re-does those steps and logs them again."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            # A kill in the middle of a write leaves a partial last line; anything else is damage.
            print(f"shoal: warning: {path}:{number} is not a JSON record; dropped", file=sys.stderr)
            continue
        if step <= after_step:
            kept.append(line)
    # Written beside and renamed over: a kill now leaves the old file or the new one, never half of it.
    for left in path.parent.glob(f".{path.name}.tmp-*"):  # a killed truncation's (the run holds the lock)
        left.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            from shoal.errors import ShoalError

            raise ShoalError(f"could not rewrite {path} for the resumed run: {err.strerror or err} "
                             "(disk full?); it is kept as it was") from None
        raise


class MetricsLogger:
    """Writes one record per logged step to every enabled sink; a no-op on ranks other than 0."""

    def __init__(
        self,
        experiment_dir: Path,
        enabled: bool,
        tensorboard: bool,
        wandb_cfg: dict[str, Any] | None,
        total_steps: int,
        start_step: int,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.tb = None
        self.wandb = None
        self.interactive = sys.stderr.isatty()
        if not enabled:
            return
        self.jsonl_path = experiment_dir / "metrics.jsonl"
        truncate_metrics(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(experiment_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("shoal: tensorboard is not installed; `pip install shoal[tensorboard]`", file=sys.stderr)
        if wandb_cfg is not None:
            self.wandb = self._start_wandb(experiment_dir, wandb_cfg)

    @staticmethod
    def _start_wandb(experiment_dir: Path, cfg: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            from shoal.errors import ShoalError

            raise ShoalError("--wandb needs the wandb package: pip install 'shoal[wandb]'") from None
        # The API key comes from the flag or WANDB_API_KEY and is handed to wandb in memory only.
        if cfg.get("token"):
            wandb.login(key=cfg["token"], relogin=True, verify=False) if os.environ.get("WANDB_MODE") != "offline" else None
        return wandb.init(
            project=cfg.get("project") or "shoal",
            name=cfg.get("name"),
            dir=str(experiment_dir),
            config=cfg.get("config"),
            resume="allow",
            id=cfg.get("run_id"),
        )

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        # Seconds since this process started logging: it drops where a resumed run begins a new
        # segment, which is how `shoal report` marks resumes and adds up wall time.
        elapsed = round(time.perf_counter() - self.start_time, 3)
        self.jsonl.write(json.dumps({**record, "elapsed_s": elapsed}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def progress(self, step: int, record: dict[str, Any]) -> None:
        """One human-readable line: step, loss, lr, throughput, memory and ETA."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
        parts = [f"step {step}/{self.total_steps}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "grad_norm" in record:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        if "tokens_per_s_per_gpu" in record:
            parts.append(f"{record['tokens_per_s_per_gpu']:,.0f} tok/s/dev")
        if record.get("mfu") is not None:
            mfu = f"MFU {100 * record['mfu']:.1f}%"
            if "mfu_fp8_peak" in record:  # FP8 runs: against both peaks, labelled
                fp8 = record["mfu_fp8_peak"]
                mfu += f" of bf16 peak, {100 * fp8:.1f}% of fp8 peak" if fp8 is not None else " of bf16 peak"
            parts.append(mfu)
        if "memory_gib" in record:
            parts.append(f"mem {record['memory_gib']:.1f}GiB")
        parts.append(f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
