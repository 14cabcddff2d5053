"""shoal's lm-eval backend against lm-eval's own `hf` backend on the exported model, for a
log-likelihood task, a rolling log-likelihood task and a generation task written by the test
(task YAML + local JSONL, nothing from the hub). Per-sample answers and log-likelihoods must agree,
and so must the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("what do fish do in water", ["swim", "fly", "sing"], 0),
    ("where do fish swim", ["in water", "in the sky", "on roads"], 0),
    ("a group of fish is a", ["shoal", "tree", "car"], 0),
    ("how many legs has a fish", ["none", "four", "six"], 0),
    ("what colour is the sea", ["blue", "green", "red"], 0),
    ("what do birds do", ["fly", "swim", "read"], 0),
]


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": f"The {q} question: {c[0]}."}) + "\n"
                                               for q, c, _ in QUESTIONS))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder / 'train.jsonl'}\n" \
           f"    test: {folder / 'test.jsonl'}\ntraining_split: train\ntest_split: test\n"
    (folder / "choice.yaml").write_text(
        "task: shoal_choice\n" + data + "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "generate.yaml").write_text(
        "task: shoal_generate\n" + data + "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{choices[0]}}\"\ngeneration_kwargs:\n  until: [\"\\n\", \"Question:\"]\n  max_gen_toks: 16\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (folder / "rolling.yaml").write_text(
        f"task: shoal_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return folder


def evaluate(model, tasks: list[str], include: Path, **options) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(include), include_defaults=False),
                           log_samples=True, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                           fewshot_random_seed=1234, batch_size=2, **options)


def responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("chat", [False, True])
def test_shoal_backend_scores_what_the_hf_backend_scores(train_assets: TrainAssets, tmp_path: Path, chat: bool):
    from shoal.eval.harness import ShoalLM
    from shoal.generate.load import load_for_generation

    include = write_tasks(tmp_path / "tasks")
    assert shoal("export", "--source", train_assets.checkpoint, "--output_path", tmp_path / "hf") == 0
    tasks = ["shoal_choice", "shoal_generate", "shoal_rolling"] if not chat else ["shoal_choice", "shoal_generate"]
    options = dict(num_fewshot=2, apply_chat_template=chat, fewshot_as_multiturn=chat)
    ours = evaluate(ShoalLM(load_for_generation(train_assets.checkpoint, device="cpu"), batch_size=2),
                    tasks, include, **options)
    theirs = evaluate("hf", tasks, include, model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", device="cpu",
                      **options)
    for task in tasks:
        got, expected = responses(ours, task), responses(theirs, task)
        assert len(got) == len(expected) == len(QUESTIONS)
        for a, b in zip(got, expected):
            if task == "shoal_generate":
                assert a == b  # the same generated text
            else:
                flat_a = [x for resp in a for x in (resp if isinstance(resp, (list, tuple)) else [resp])]
                flat_b = [x for resp in b for x in (resp if isinstance(resp, (list, tuple)) else [resp])]
                for x, y in zip(flat_a, flat_b, strict=True):
                    assert x == pytest.approx(y, rel=1e-4, abs=1e-4)
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    if not chat:
        assert any(text != [""] for text in responses(ours, "shoal_generate"))  # it did generate something


def test_command_writes_results_beside_the_checkpoint(train_assets: TrainAssets, tmp_path: Path, capsys):
    import shutil

    include = write_tasks(tmp_path / "tasks")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(train_assets.checkpoint, ckpt)
    assert shoal("eval", "--source", ckpt, "--tasks", "shoal_choice", "--include_path", include,
                 "--device", "cpu", "--limit", 3) == 0
    out = capsys.readouterr().out
    assert "shoal_choice" in out and "acc" in out
    results = json.loads((tmp_path / "ckpt.lm_eval.shoal_choice.json").read_text())
    assert 0 <= results["results"]["shoal_choice"]["acc,none"] <= 1
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in train_assets.checkpoint.iterdir())


@pytest.mark.slow  # the unknown name makes lm-eval index its ~15k built-in tasks (about a minute)
def test_unknown_and_offline_tasks_are_refused(train_assets: TrainAssets, tmp_path: Path, capsys, monkeypatch):
    include = write_tasks(tmp_path / "tasks")
    assert shoal("eval", "--source", train_assets.checkpoint, "--tasks", "shoal_chioce", "--include_path",
                 include, "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s): 'shoal_chioce' (did you mean shoal_choice" in err
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert shoal("eval", "--source", train_assets.checkpoint, "--tasks", "arc_easy", "--include_path", include,
                 "--device", "cpu", "--output", tmp_path / "r.json") == 2
    err = capsys.readouterr().err
    assert "could not load the data of task(s) arc_easy" in err and "--include_path" in err
    assert not (tmp_path / "r.json").exists()


def test_without_lm_eval_tasks_say_how_to_install(train_assets: TrainAssets, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of it now fails as if it were absent
    assert shoal("eval", "--source", train_assets.checkpoint, "--tasks", "anything", "--device", "cpu") == 2
    assert "pip install 'shoal[eval]'" in capsys.readouterr().err
    # The loss mode does not need it.
    assert shoal("eval", "--source", train_assets.checkpoint, "--dataset_path", train_assets.sft_dir,
                 "--seq_length", 64, "--max_samples", 2, "--device", "cpu") == 0
