"""A shoal model as an lm-evaluation-harness backend, and the task run behind `shoal eval --tasks`.

`ShoalLM` answers lm-eval's three request types with shoal's own model, on a checkpoint as it is
(no export): log-likelihood of a continuation, rolling log-likelihood of a whole text (in windows
of the model's context), and generation until a stop string (through `shoal.generate.decode`).
Tokenization, truncation and windowing follow lm-eval's `hf` backend (the same helpers of
`lm_eval.models.utils` and `lm_eval.utils`), so both backends score the same requests on the
same tokens and a checkpoint scores what its export scores with `--model hf`.

lm-eval is an optional dependency (`pip install shoal[eval]`); this module imports it at the top
and is itself imported only by `shoal eval --tasks`.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from shoal.errors import ShoalError
from shoal.generate.decode import generate_tokens
from shoal.generate.load import LoadedModel
from shoal.generate.sampling import SamplingSettings


class ShoalLM(TemplateLM):
    """lm-eval's view of a loaded shoal model (one device, one process)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.max_length = loaded.model.config.max_position_embeddings
        self._device = next(loaded.model.parameters()).device
        self.stop_token_ids = loaded.stop_token_ids()

    # -- tokens ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, None)
        # A string that already starts with BOS (a chat template's output) gets no second one.
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- log-likelihood ------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), whether greedy decoding gives the continuation)."""
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            # The window lm-eval's hf backend feeds: the last max_length tokens before the final one.
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            longest = max(len(i) for i in inputs)
            batch = torch.zeros(len(inputs), longest, dtype=torch.long)
            for row, ids in enumerate(inputs):  # right padding: causal attention never sees it
                batch[row, :len(ids)] = torch.tensor(ids)
            logprobs = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)
            for row, (request, _, cont) in enumerate(chunk):
                end = len(inputs[row])
                picked = logprobs[row, end - len(cont):end]  # [len(cont), V]
                target = torch.tensor(cont, device=picked.device)
                greedy = bool((picked.argmax(-1) == target).all())
                total = float(picked.gather(1, target[:, None]).sum())
                results.append((total, greedy))
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the model's context."""
        scores = []
        for (text,) in [r.args for r in requests]:
            windows = [(None,) + make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            scores.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return scores

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same generation settings, each row stopping at an end token
        or once one of its stop strings appears; the text is then cut at the first stop string."""
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        args = [r.args for r in requests]
        answers: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(index)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(args[indices[0]][1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            settings = SamplingSettings(do_sample=bool(kwargs.get("do_sample")),
                                        temperature=float(kwargs.get("temperature") or 1.0),
                                        top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                        seed=kwargs.get("seed"))

            def seen_stop(row: int, ids: list[int], until: list[str] = until) -> bool:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                return any(stop in text for stop in until)

            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self._encode_context(args[i][0], self.max_length - max_new) for i in chunk]
                done = generate_tokens(self.model, prompts, max_new, settings, self.stop_token_ids,
                                       is_finished=seen_stop)
                for i, completion in zip(chunk, done):
                    text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                    answers[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", args[i], answers[i])
        return answers

    def _encode_context(self, context: str, room: int) -> list[int]:
        """The context as the hf backend's batch encoding gives it, cut on the left to `room` tokens."""
        if room <= 0:
            raise ShoalError(f"a task asks for more new tokens than the model's context ({self.max_length}) holds")
        special = {"add_special_tokens": False} if has_bos_prefix(context, self.tokenizer.bos_token) else {}
        ids = self.tokenizer(context, **special)["input_ids"]
        return ids[-room:]


@functools.lru_cache(maxsize=4)
def task_index(include_path: str | None, with_builtin: bool):
    """lm-eval's TaskManager, built once per process (the built-in index takes a minute to scan)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=with_builtin)


def check_task_names(names: list[str], task_manager) -> None:
    """Every name must be a task, group or tag lm-eval knows (including --include_path ones)."""
    known = set(task_manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ShoalError(f"unknown lm-eval task(s): {'; '.join(hints)}. `lm-eval ls tasks` lists them; "
                         "a task of your own is a YAML file in a folder given with --include_path")


def load_tasks(names: list[str], task_manager) -> None:
    """Build the tasks once, so that data that cannot be had (offline, a hub dataset) is said clearly."""
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict(names, task_manager)
    except Exception as err:  # datasets raises many kinds: ConnectionError, FileNotFoundError, ...
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ShoalError(
            f"could not load the data of task(s) {', '.join(names)}: {type(err).__name__}: {detail[:300]}. "
            "Hub datasets need the network (or the Hugging Face datasets cache); offline, write a task YAML "
            "whose dataset_path is json with local data_files, and pass its folder with --include_path"
        ) from None


def run_tasks(loaded: LoadedModel, tasks: list[str], num_fewshot: int | None, include_path: str | None,
              apply_chat_template: bool, fewshot_as_multiturn: bool, limit: int | None, batch_size: int,
              seed: int) -> dict:
    """lm-eval's `simple_evaluate` with the shoal backend; returns its results dict."""
    from lm_eval import simple_evaluate

    task_manager = None
    if include_path:  # indexing lm-eval's ~15k built-in tasks takes a minute: skip it when yours suffice
        task_manager = task_index(include_path, with_builtin=False)
        if any(name not in task_manager.all_tasks for name in tasks):
            task_manager = None
    task_manager = task_manager or task_index(include_path, with_builtin=True)
    check_task_names(tasks, task_manager)
    load_tasks(tasks, task_manager)
    return simple_evaluate(
        model=ShoalLM(loaded, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot,
        task_manager=task_manager, apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn, limit=limit, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
    )
