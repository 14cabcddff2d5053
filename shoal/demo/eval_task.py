"""The demo's local lm-eval task: the held-out questions as a generation task scored by exact match.

`shoal eval --tasks demo_qa --include_path DIR` runs it on a shoal checkpoint through shoal's own
lm-eval backend, with no hub access: the task's data is the demo's `test.jsonl`, read as a local
JSON dataset, and the prompt goes through the checkpoint's chat template (`--apply_chat_template`).
"""

from __future__ import annotations

from pathlib import Path

TASK_NAME = "demo_qa"


def write_task(task_dir: Path, test_file: Path, limit: int | None = None) -> Path:
    """Write `demo_qa.yaml` (and its data file, the first `limit` rows) into `task_dir`."""
    import json

    task_dir.mkdir(parents=True, exist_ok=True)
    rows = [line for line in test_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = task_dir / "demo_qa.jsonl"
    data.write_text("".join(json.dumps(json.loads(r), ensure_ascii=False) + "\n" for r in rows[:limit]),
                    encoding="utf-8")
    yaml_text = f"""task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{input}}}}"
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ['^\\s+', '\\s+$']
"""
    path = task_dir / f"{TASK_NAME}.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    return path
