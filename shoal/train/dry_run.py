"""`--dryrun` for the training commands: every check that can be made before launching, then
what would run, and nothing started (no process, no experiment folder, no checkpoint).

Printed: the resolved recipe (the YAML config.yaml would hold), the start checkpoint, the model,
the data (documents, tokens, samples, steps), the run's plan, the layout, and the launch
command (torchrun line or sbatch script). The checks are the run's own: the start checkpoint and
its shape, the layout against the world size the command asks for, --num_gpus against this
machine's GPUs, the data as the ranks would read it. So an error shows once, before N ranks start.
"""

from __future__ import annotations

import sys

import yaml

from shoal.config.loader import to_dict
from shoal.config.recipe import Recipe
from shoal.config.resolve import experiment_dir
from shoal.distributed import check_parallel_layout
from shoal.distributed.layout_checks import data_parallel_sizes
from shoal.errors import ShoalError
from shoal.train.run_plan import plan_run
from shoal.train.start import check_start, find_start


def _check_devices(recipe: Recipe) -> str:
    import torch

    launch = recipe.launch
    if launch.executor != "local":
        return f"{launch.num_nodes} node(s) × {launch.num_gpus} GPU(s) under Slurm"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if launch.num_gpus > count:
            raise ShoalError(f"--num_gpus {launch.num_gpus}, but this machine has {count} GPU(s)")
        return f"{launch.num_gpus} of this machine's {count} GPU(s)"
    return f"{launch.num_gpus} CPU process(es) (no GPU here: gloo)"


def dry_run(recipe: Recipe, make_datasets, argv: list[str] | None) -> int:
    from shoal.launch import maybe_launch

    out = sys.stdout
    world = recipe.launch.world_size
    exp = experiment_dir(recipe)
    start = find_start(recipe.model, recipe.checkpoint, exp)
    check_start(start, recipe.data.seq_length)
    t, p = recipe.train, recipe.parallel
    check_parallel_layout(p, world, start.model_config, seq_length=recipe.data.seq_length,
                          global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size)
    devices = _check_devices(recipe)
    datasets = make_datasets(recipe, start.tokenizer_dir, True)
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    replicas, shards = data_parallel_sizes(p, world)  # the sizes the ranks' mesh will have
    dp = replicas * shards
    plan = plan_run(t, recipe.stage, datasets.max_steps, recipe.data.seq_length, dp, len(datasets.train))

    print(f"# shoal {recipe.stage} --dryrun: nothing is started. The resolved recipe (config.yaml):", file=out)
    print(yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True), file=out, end="")
    print("# what would run", file=out)
    if start.resume is not None:
        print(f"start: resume {start.resume.path} (step {start.resume.step})", file=out)
    elif start.weights is not None:
        print(f"start: weights of {start.weights}", file=out)
    else:
        print(f"start: random weights of preset {recipe.model.preset}", file=out)
    cfg = start.model_config
    experts = (f" ({cfg.num_active_params / 1e9:.2f}B active: {cfg.num_experts_per_tok} of {cfg.num_experts} "
               f"experts per token)") if cfg.is_moe else ""
    print(f"model: {cfg.family}, {cfg.num_params / 1e9:.2f}B parameters{experts}, {cfg.num_layers} layers, hidden "
          f"{cfg.hidden_size}, vocab {cfg.vocab_size}"
          + (f"; LoRA{' (DoRA)' if recipe.peft.use_dora else ''} rank {recipe.peft.rank} on "
             f"{', '.join(recipe.peft.target_modules)}" if recipe.peft else ""), file=out)
    print("data: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                               for k, v in datasets.summary.items()), file=out)
    print(f"plan: {plan.summary()}", file=out)
    for note in plan.notes:
        print(f"note: {note}", file=out)
    print(f"layout: {world} process(es) = tensor {tp} × pipeline {pp} × context {cp} × data {dp}; {devices}",
          file=out)
    print(f"experiment: {exp} ({'has checkpoints' if start.resume else 'new'})", file=out)
    print("launch:", file=out, flush=True)
    if argv is not None and (world > 1 or recipe.launch.executor != "local"):
        return maybe_launch(recipe.launch, argv=argv, experiment_dir=exp) or 0
    print("one process in this shell: " + " ".join(argv or ["(from Python)"]).replace(" --dryrun", "")
          .replace(" --dry-run", ""), file=out)
    return 0


