"""Conversion cost of `shoal import` / `shoal export` against copying the same bytes with `cp`.

    python bench/convert.py --preset llama32_1b --repeats 3 --output bench/results/convert_llama32_1b_cpu.json
    python bench/convert.py --preset llama31_8b --repeats 1 --output bench/results/convert_llama31_8b_cpu.json

Makes a random checkpoint of the preset's shape as `save_pretrained` would write it: tensor names
and shapes from `transformers.AutoModelForCausalLM.from_config` on the meta device (a tied
`lm_head.weight` is left out, as HF does), bf16 values ~ N(0, 0.02), safetensors shards of at
most `--shard_size` with `model.safetensors.index.json`, `config.json` (shoal's `to_hf_config`)
and `generation_config.json`, and the demo's tokenizer (`shoal/demo/assets/tokenizer`, checked
against `vocab_size` by the import as a user's would be).

Then, in the same run and each as its own child process (wall time and `ru_maxrss` from `os.wait4`):
  import phase: `cp -r HF COPY` and `shoal import --source HF --output_path CKPT`, alternating,
  export phase: `cp -r CKPT COPY` and `shoal export --source CKPT --output_path OUT`, alternating,
`--repeats` times each, outputs removed between runs, plus an interpreter baseline: a child that
only imports shoal's CLI and conversion modules (its peak RSS and, alternating with the others,
its wall time: the start-up, reported beside the ratio of what is left after it). One more,
untimed run of each conversion records whether it imported torch. Medians are reported (min/max in the JSON).

Fairness: `sync` runs (untimed) before every timed command so no earlier dirty pages are charged
to it, and the command's source is read once (untimed) so that cp and shoal both start from a
warm page cache (skipped when the source is over half the RAM; then both read partly from disk).
Two times are given: the command alone ("wall"), and the command plus a `sync` after it
("durable"): shoal's DCP writer fsyncs each file it writes, `cp` does not, so "wall" favours cp
and "durable" compares the same end state (the bytes on disk). Targets (issue 19): time
<= 1.2x the copy, and (peak RSS - interpreter RSS) <= 1.5x the largest shard.

The exported safetensors are checked tensor by tensor against the source before anything is
reported. Results go to stdout and, as JSON, to `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.convert.options import parse_size  # noqa: E402
from shoal.models import get_preset, to_hf_config  # noqa: E402

TIME_TARGET = 1.2  # issue 19
RSS_TARGET = 1.5
INTERPRETER_MODULES = "import shoal.cli, shoal.convert.importer, shoal.convert.exporter"
TOKENIZER = Path(__file__).resolve().parents[1] / "shoal" / "demo" / "assets" / "tokenizer"


def hf_tensor_specs(hf_config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor `save_pretrained` would write, in state-dict order."""
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    specs = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied weight (lm_head -> embed_tokens): HF stores it once
            continue
        seen.add(id(tensor))
        specs.append((name, tuple(tensor.shape)))
    return specs


def make_hf_checkpoint(preset: str, out: Path, shard_size: int, seed: int = 0) -> dict:
    """Write a random bf16 HF checkpoint of the preset's shape into `out`; returns its description."""
    from safetensors.torch import save_file

    hf_config = to_hf_config(get_preset(preset), dtype="bfloat16")
    specs = hf_tensor_specs(hf_config)
    nbytes = {name: 2 * _numel(shape) for name, shape in specs}
    shards: list[list[str]] = []
    size = 0
    for name, _ in specs:  # HF's rule: a new shard when the next tensor would pass the limit
        if not shards or (size + nbytes[name] > shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    files = ([f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
             if len(shards) > 1 else ["model.safetensors"])
    shapes = dict(specs)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    weight_map = {}
    for shard, file in zip(shards, files):
        tensors = {name: torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
                   for name in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: file for name in shard})
    total = sum(nbytes.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": hf_config.get("bos_token_id"),
                  "eos_token_id": hf_config.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for item in TOKENIZER.iterdir():
        shutil.copyfile(item, out / item.name)
    return {"tensors": len(specs), "files": len(files), "weight_bytes": total,
            "tied_embeddings": bool(hf_config.get("tie_word_embeddings")),
            "largest_shard_bytes": max((out / f).stat().st_size for f in files)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def largest_file(path: Path, pattern: str = "*") -> int:
    return max(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def warm(path: Path) -> None:
    """Read every file under `path` once, so the timed command finds it in the page cache."""
    if dir_bytes(path) > mem_total() // 2:
        return
    buf = bytearray(16 << 20)
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


# Runs one command and reports its wall time and peak RSS. It is a small separate process
# because Linux carries the RSS high-water mark of the forking process into the child's ru_maxrss
# (fork copies the page tables; vfork+exec records the shared mm's peak), so a child forked
# straight from this (large) bench process would report at least this process's peak.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
os.sync()
print(json.dumps({"wall_s": wall, "durable_s": time.perf_counter() - start,
                  "rc": os.waitstatus_to_exitcode(status), "maxrss_bytes": usage.ru_maxrss * 1024}))
"""


def load_average() -> float:
    """The 1-minute load average: the machine is shared, so each figure is noted with it."""
    return os.getloadavg()[0]


def measure(cmd: list[str], source: Path | None) -> dict:
    """Run `cmd` as a grandchild: wall seconds, seconds including a sync after it, peak RSS bytes,
    and the load average just before it started."""
    if source is not None:
        warm(source)
    os.sync()
    load = load_average()
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"rc": done.returncode}
    if done.returncode != 0 or result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result['rc']}):\n{done.stderr[-3000:]}")
    return {**{k: result[k] for k in ("wall_s", "durable_s", "maxrss_bytes")}, "load": load}


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def shoal_cmd() -> list[str]:
    script = Path(sys.executable).parent / "shoal"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "shoal.cli"]


def summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


IMPORTS_TORCH = """
import sys
from shoal.cli import main
rc = main(sys.argv[1:])
print("torch" in sys.modules)
sys.exit(rc)
"""


def imports_torch(shoal_args: list[str]) -> bool:
    """Whether the conversion `shoal_args` imports torch (an untimed run of its own)."""
    done = subprocess.run([sys.executable, "-c", IMPORTS_TORCH, *shoal_args], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


def run_phase(name: str, source: Path, cp_out: Path, shoal_out: Path, shoal_args: list[str],
              repeats: int, keep_last: bool) -> dict:
    """Alternate `cp -r source cp_out` and shoal; the last shoal output stays when `keep_last`."""
    cp_runs, shoal_runs, startup_runs = [], [], []
    for i in range(repeats):
        cp_runs.append(measure(["cp", "-r", str(source), str(cp_out)], source))
        remove(cp_out)
        startup_runs.append(measure([sys.executable, "-c", INTERPRETER_MODULES], None))
        shoal_runs.append(measure(shoal_cmd() + shoal_args, source))
        if not (keep_last and i == repeats - 1):
            remove(shoal_out)
        print(f"  {name} {i + 1}/{repeats}: cp {cp_runs[-1]['wall_s']:.1f}s (durable {cp_runs[-1]['durable_s']:.1f}s), "
              f"shoal {shoal_runs[-1]['wall_s']:.1f}s (durable {shoal_runs[-1]['durable_s']:.1f}s), "
              f"shoal peak RSS {shoal_runs[-1]['maxrss_bytes'] / 2**20:.0f} MiB, load {shoal_runs[-1]['load']:.1f}",
              flush=True)
    torch_imported = imports_torch(shoal_args)
    print(f"  {name}: imports torch: {torch_imported}", flush=True)
    if not keep_last:
        remove(shoal_out)
    return {"imports_torch": torch_imported, "cp_runs": cp_runs, "shoal_runs": shoal_runs, "startup_runs": startup_runs,
            "startup_wall_s": summary(startup_runs, "wall_s"),
            "cp": {k: summary(cp_runs, k) for k in ("wall_s", "durable_s", "maxrss_bytes", "load")},
            "shoal": {k: summary(shoal_runs, k) for k in ("wall_s", "durable_s", "maxrss_bytes", "load")}}


def verify(source: Path, exported: Path) -> int:
    """Every source tensor equals the exported one of the same name (streamed); returns the count."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.is_file():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    src, out = index(source), index(exported)
    if set(src) != set(out):
        raise RuntimeError(f"exported names differ: missing {sorted(set(src) - set(out))[:5]}, "
                           f"extra {sorted(set(out) - set(src))[:5]}")
    by_file: dict[Path, list[str]] = {}
    for name, file in src.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name in names:
                with safe_open(str(out[name]), "pt") as g:
                    a, b = f.get_tensor(name), g.get_tensor(name)
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                    raise RuntimeError(f"exported tensor {name} differs from the source")
                del a, b
    return len(src)


def ratio_row(label: str, phase: dict, largest: int, interp: int) -> dict:
    cp, sh = phase["cp"], phase["shoal"]
    startup_s = phase["startup_wall_s"]["median"]
    peak = sh["maxrss_bytes"]["median"]
    return {
        # What the conversion itself costs: shoal's time less that of an interpreter that only
        # imports its modules (torch, DCP: seconds on a loaded 2-core machine; measured in the same
        # alternation), against the copy.
        "startup_s": startup_s,
        "imports_torch": phase["imports_torch"],
        "time_ratio_durable_after_startup": (sh["durable_s"]["median"] - startup_s) / cp["durable_s"]["median"],
        "phase": label,
        "cp_wall_s": cp["wall_s"]["median"], "shoal_wall_s": sh["wall_s"]["median"],
        "time_ratio_wall": sh["wall_s"]["median"] / cp["wall_s"]["median"],
        "cp_durable_s": cp["durable_s"]["median"], "shoal_durable_s": sh["durable_s"]["median"],
        "time_ratio_durable": sh["durable_s"]["median"] / cp["durable_s"]["median"],
        "peak_rss_bytes": peak, "interpreter_rss_bytes": interp, "largest_shard_bytes": largest,
        "rss_ratio": (peak - interp) / largest,
        "peak_rss_ratio_incl_interpreter": peak / largest,
        "load_min": min(r["load"] for r in phase["cp_runs"] + phase["shoal_runs"]),
        "load_max": max(r["load"] for r in phase["cp_runs"] + phase["shoal_runs"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama32_1b")
    parser.add_argument("--shard_size", default=None,
                        help="largest source safetensors file (default 1GB for presets under 4B params, else 5GB)")
    parser.add_argument("--export_shard_size", default="5GB", help="shoal export --max_shard_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="scratch folder (default a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    cfg = get_preset(args.preset)
    shard_size = parse_size(args.shard_size or ("1GB" if cfg.num_params < 4e9 else "5GB"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-bench-convert-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    hf, ckpt, export = work / "hf", work / "ckpt", work / "export"
    try:
        t0 = time.perf_counter()
        made = make_hf_checkpoint(args.preset, hf, shard_size)
        print(f"made {hf}: {made['tensors']} tensors, {made['files']} files, {made['weight_bytes'] / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
        hf_bytes = dir_bytes(hf)
        interp_runs = [measure([sys.executable, "-c", INTERPRETER_MODULES], None) for _ in range(args.repeats)]
        interp = statistics.median(r["maxrss_bytes"] for r in interp_runs)

        imp = run_phase("import", hf, work / "hf_copy", ckpt,
                        ["import", "--source", str(hf), "--output_path", str(ckpt), "--overwrite"],
                        args.repeats, keep_last=True)
        ckpt_bytes = dir_bytes(ckpt)
        ckpt_largest = largest_file(ckpt)
        exp = run_phase("export", ckpt, work / "ckpt_copy", export,
                        ["export", "--source", str(ckpt), "--output_path", str(export), "--overwrite",
                         "--max_shard_size", args.export_shard_size],
                        args.repeats, keep_last=True)
        export_largest = largest_file(export, "*.safetensors")
        t0 = time.perf_counter()
        checked = verify(hf, export)
        print(f"verified: {checked} exported tensors equal the source ({time.perf_counter() - t0:.0f}s)", flush=True)

        # The shard the RSS is compared with: the largest safetensors file on the HF side of each
        # conversion (the source of an import, the output of an export).
        rows = [ratio_row("import", imp, made["largest_shard_bytes"], interp),
                ratio_row("export", exp, export_largest, interp)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    gb, mib = 1e9, 2**20
    ok = lambda v, t: "PASS" if v <= t else "MISS"  # noqa: E731
    print(f"\n{args.preset}: {made['weight_bytes'] / gb:.2f} GB of bf16 weights, {made['files']} source shards "
          f"(largest {made['largest_shard_bytes'] / gb:.2f} GB), shoal checkpoint {ckpt_bytes / gb:.2f} GB "
          f"(largest file {ckpt_largest / gb:.2f} GB); median of {args.repeats}; {os.cpu_count()} CPUs")
    print(f"{'phase':7s} {'cp s':>6s} {'shoal s':>8s} {'ratio':>6s} {'cp+sync':>8s} {'shoal+sync':>10s} {'ratio':>6s} "
          f"{'time':>5s} {'peak MiB':>9s} {'interp MiB':>10s} {'shard MiB':>9s} {'(pk-int)/shard':>14s} {'RSS':>5s} "
          f"{'load':>9s} {'start s':>7s} {'-start':>6s}")
    for r in rows:
        print(f"{r['phase']:7s} {r['cp_wall_s']:6.1f} {r['shoal_wall_s']:8.1f} {r['time_ratio_wall']:5.2f}x "
              f"{r['cp_durable_s']:8.1f} {r['shoal_durable_s']:10.1f} {r['time_ratio_durable']:5.2f}x "
              f"{ok(r['time_ratio_durable'], TIME_TARGET):>5s} {r['peak_rss_bytes'] / mib:9.0f} "
              f"{r['interpreter_rss_bytes'] / mib:10.0f} {r['largest_shard_bytes'] / mib:9.0f} "
              f"{r['rss_ratio']:13.2f}x {ok(r['rss_ratio'], RSS_TARGET):>5s} {r['load_min']:4.1f}-{r['load_max']:<4.1f} "
              f"{r['startup_s']:7.1f} {r['time_ratio_durable_after_startup']:5.2f}x")
    print(f"targets: time (cp+sync basis) <= {TIME_TARGET}x the copy; (peak - interpreter) RSS <= {RSS_TARGET}x "
          "the largest shard. Wall-only ratios favour cp, which does not fsync.")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({
            "args": vars(args), "machine": {"cpus": os.cpu_count(), "ram_bytes": mem_total(),
                                            "platform": platform.platform(), "torch": torch.__version__},
            "checkpoint": {**made, "hf_dir_bytes": hf_bytes, "shoal_ckpt_bytes": ckpt_bytes,
                           "shoal_ckpt_largest_file_bytes": ckpt_largest, "export_largest_shard_bytes": export_largest},
            "interpreter_runs": interp_runs, "import": imp, "export": exp, "summary": rows,
            "verified_tensors": checked,
            "targets": {"time_ratio": TIME_TARGET, "rss_ratio": RSS_TARGET},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
