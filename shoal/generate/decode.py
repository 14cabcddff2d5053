"""The decoding loop: prompts of token ids in, new token ids out, through shoal's KV cache.

A batch of prompts of different lengths is left-padded into one tensor; the cache's attention
mask keeps padding out of attention and its positions count each row's real tokens, so a row
generates what it would generate alone. The prompt is read once (prefill), then each step feeds
one token per row. A row stops at the first of its stop tokens or after `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shoal.errors import ShoalError
from shoal.generate.sampling import SamplingSettings, make_generator, next_tokens
from shoal.models.model import KVCache

# Called as on_token(row, token_id) for each generated token that is not a stop token.
TokenCallback = Callable[[int, int], None]
# Called as is_finished(row, token_ids so far) after each token; True ends that row (a stop string seen).
FinishCheck = Callable[[int, list[int]], bool]


@dataclass
class Completion:
    """What one prompt produced. token_ids exclude the stop token; finish_reason is "stop" or "length"."""

    token_ids: list[int]
    finish_reason: str
    stop_token_id: int | None = None


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _check_lengths(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ShoalError("every prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ShoalError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise ShoalError(f"a prompt of {longest} tokens plus --max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_position_embeddings ({limit}); shorten the prompt or ask for fewer tokens")


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    settings: SamplingSettings,
    stop_token_ids: Sequence[int] = (),
    on_token: TokenCallback | None = None,
    use_cache: bool = True,
    is_finished: FinishCheck | None = None,
) -> list[Completion]:
    """Generate for each prompt (lists of token ids) in one batch.

    use_cache=False recomputes the whole sequence for every token, one row at a time, with the
    model's plain (training) forward: slow, and there to check the cache against.
    """
    _check_lengths(model, prompts, max_new_tokens)
    device, dtype = _device_and_dtype(model)
    stops = set(int(t) for t in stop_token_ids)
    generator = make_generator(settings, device)
    b = len(prompts)
    completions = [Completion([], "length") for _ in range(b)]
    done = [False] * b

    if use_cache:
        longest = max(len(p) for p in prompts)
        tokens = torch.zeros(b, longest, dtype=torch.long, device=device)
        real = torch.zeros(b, longest, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):  # left padding: every row's last token is at the end
            tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            real[row, longest - len(prompt):] = True
        cache = KVCache(model.config, b, longest + max_new_tokens, device, dtype)
        logits = model(tokens, cache=cache, attention_mask=real)[:, -1]
    else:
        sequences = [list(p) for p in prompts]
        logits = _full_recompute(model, sequences, device)

    for _ in range(max_new_tokens):
        chosen = next_tokens(logits.float(), settings, generator)
        for row, token in enumerate(chosen.tolist()):
            if done[row]:
                continue
            if token in stops:
                done[row] = True
                completions[row].finish_reason, completions[row].stop_token_id = "stop", token
                continue
            completions[row].token_ids.append(token)
            if on_token is not None:
                on_token(row, token)
            if is_finished is not None and is_finished(row, completions[row].token_ids):
                done[row] = True
                completions[row].finish_reason = "stop"
        if all(done) or all(len(c.token_ids) == max_new_tokens for c, d in zip(completions, done) if not d):
            break
        if use_cache:
            logits = model(chosen[:, None], cache=cache)[:, -1]
        else:
            for row, token in enumerate(chosen.tolist()):
                sequences[row].append(token)
            logits = _full_recompute(model, sequences, device)
    return completions


def _full_recompute(model: nn.Module, sequences: list[list[int]], device: torch.device) -> torch.Tensor:
    """Last-position logits [B, V] of each sequence, each run alone from its first token."""
    rows = [model(torch.tensor([seq], dtype=torch.long, device=device))[:, -1] for seq in sequences]
    return torch.cat(rows)
