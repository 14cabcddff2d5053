"""The decoding loop on its own terms: the cache against recomputing everything, a batch against
one prompt at a time, seeded sampling, and the top-k/top-p filters against transformers' warpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shoal.generate.decode import generate_tokens
from shoal.generate.load import load_for_generation
from shoal.generate.sampling import SamplingSettings, filter_logits
from tests.helpers.generation import TinyModel, shoal

GREEDY = SamplingSettings()
SAMPLED = SamplingSettings(do_sample=True, temperature=0.9, top_p=0.95, top_k=40, seed=7)


def prompts(n: int = 4) -> list[list[int]]:
    """Prompts of different lengths (3 to 3 + 7 * (n - 1) tokens), random ids of the tiny vocabulary."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(6, 256, (3 + 7 * i,), generator=gen).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model: TinyModel):
    return load_for_generation(tiny_model.checkpoint, device="cpu").model


def test_cache_equals_recomputing_every_token(model):
    batch = prompts()
    with_cache = generate_tokens(model, batch, 16, GREEDY)
    without = generate_tokens(model, batch, 16, GREEDY, use_cache=False)
    assert [c.token_ids for c in with_cache] == [c.token_ids for c in without]


def test_cached_logits_equal_the_full_forward(model):
    """Beyond the argmax: each step's logits through the cache equal the plain forward's at the same
    position, for left-padded rows too."""
    from shoal.models.model import KVCache

    batch = prompts(3)
    longest = max(map(len, batch))
    steps = torch.randint(6, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(3, longest, dtype=torch.long)
    real = torch.zeros(3, longest, dtype=torch.bool)
    for row, p in enumerate(batch):
        tokens[row, longest - len(p):], real[row, longest - len(p):] = torch.tensor(p), True
    cache = KVCache(model.config, 3, longest + 5, "cpu", torch.float32)
    with torch.no_grad():
        got = [model(tokens, cache=cache, attention_mask=real)[:, -1]]
        got += [model(steps[:, i:i + 1], cache=cache)[:, -1] for i in range(4)]
        for row, p in enumerate(batch):
            full = model(torch.tensor([p + steps[row, :4].tolist()]))[0]
            expected = full[len(p) - 1:]
            # fp32, only the order of the sums differs (padded keys, chunked steps): 1e-5 of the logits' scale.
            scale = expected.abs().max().item()
            assert (torch.stack([g[row] for g in got]) - expected).abs().max().item() <= 1e-5 * scale


def test_batch_equals_one_prompt_at_a_time(model):
    batch = prompts()
    together = generate_tokens(model, batch, 16, GREEDY)
    alone = [generate_tokens(model, [p], 16, GREEDY)[0] for p in batch]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_seeded_sampling_is_reproducible(model):
    batch = prompts(2)
    first = generate_tokens(model, batch, 16, SAMPLED)
    torch.manual_seed(123)  # the global stream must not matter
    again = generate_tokens(model, batch, 16, SAMPLED)
    other = generate_tokens(model, batch, 16, SamplingSettings(**{**SAMPLED.__dict__, "seed": 8}))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_stops_per_row_and_at_max_new_tokens(model):
    batch = prompts(2)
    free = generate_tokens(model, batch, 10, GREEDY)
    stop = free[0].token_ids[2]  # row 0 stops where it first produces this token
    stopped = generate_tokens(model, batch, 10, GREEDY, stop_token_ids=[stop])
    assert stopped[0].token_ids == free[0].token_ids[:free[0].token_ids.index(stop)]
    assert stopped[0].finish_reason == "stop" and stopped[0].stop_token_id == stop
    if stop not in free[1].token_ids:
        assert stopped[1].token_ids == free[1].token_ids and stopped[1].finish_reason == "length"
    assert all(len(c.token_ids) == 10 for c in free)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 20, 0.5), (1.0, 0, 0.999)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, SamplingSettings(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_sampled_command_is_reproducible(llama: TinyModel, tmp_path: Path):
    def run(seed: int, name: str) -> list[dict]:
        assert shoal("generate", "--source", llama.checkpoint, "--prompt", "hello world", "--prompt", "the fox",
                     "--temperature", "0.8", "--top_p", "0.9", "--seed", seed, "--max_new_tokens", 12,
                     "--device", "cpu", "--output", tmp_path / name) == 0
        return [json.loads(line)["token_ids"] for line in (tmp_path / name).read_text().splitlines()]

    assert run(1, "a.jsonl") == run(1, "b.jsonl")
    assert run(1, "a2.jsonl") != run(2, "c.jsonl")


def test_one_prompt_streams_what_the_batch_path_writes(llama: TinyModel, tmp_path: Path, capsys):
    from transformers import AutoTokenizer

    assert shoal("generate", "--source", llama.checkpoint, "--prompt", "hello world", "--chat",
                 "--max_new_tokens", 12, "--device", "cpu", "--greedy", "--output", tmp_path / "o.jsonl") == 0
    capsys.readouterr()
    assert shoal("generate", "--source", llama.checkpoint, "--prompt", "hello world", "--chat",
                 "--max_new_tokens", 12, "--device", "cpu", "--greedy") == 0
    streamed = capsys.readouterr().out
    row = json.loads((tmp_path / "o.jsonl").read_text())
    tok = AutoTokenizer.from_pretrained(llama.checkpoint / "tokenizer")
    assert streamed == tok.decode(row["token_ids"], skip_special_tokens=True) + "\n" == row["completion"] + "\n"
