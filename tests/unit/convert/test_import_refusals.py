"""What `shoal import` must refuse before it writes anything (issue 14 items 7 and 10):

* a tokenizer with more tokens than the model can embed (config.json `vocab_size`), counting the
  tokens added on top of the base vocabulary; `transformers` itself is the oracle for the counts;
* a `model.safetensors.index.json` naming files outside the model folder (`../x`, absolute paths),
  even when those files exist and hold exactly the tensors asked for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from shoal.cli import main as shoal  # noqa: E402
from tests.helpers.hf_models import save_hf_checkpoint
from tests.helpers.tokenizers import SPECIAL_TOKENS, WORDS
from tests.helpers.tokenizers import word_level_tokenizer as make_tokenizer

torch.set_num_threads(1)
TOKENS = len(SPECIAL_TOKENS) + len(WORDS)  # the tiny tokenizer's size


def assert_refused(tmp_path: Path, source: Path, capsys, *phrases: str) -> str:
    out = tmp_path / "results" / "ckpt"
    code = shoal(["import", "--source", str(source), "--output_path", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert not (tmp_path / "results").exists()
    return err


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys):
    hf = tmp_path / "hf"
    save_hf_checkpoint(hf, "llama", vocab_size=TOKENS - 5)
    assert len(transformers.AutoTokenizer.from_pretrained(hf)) == TOKENS  # the oracle's count
    assert_refused(tmp_path, hf, capsys, f"{TOKENS} tokens", f"vocab_size is {TOKENS - 5}")


def test_added_tokens_are_counted(tmp_path, capsys):
    """The base vocabulary fits exactly; two tokens added on top of it do not."""
    hf = tmp_path / "hf"
    save_hf_checkpoint(hf, "llama", vocab_size=TOKENS)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(hf)
    assert len(transformers.AutoTokenizer.from_pretrained(hf)) == TOKENS + 2
    assert_refused(tmp_path, hf, capsys, f"{TOKENS + 2} tokens", "2 added", f"vocab_size is {TOKENS}")


def test_a_smaller_tokenizer_than_the_embedding_imports(tmp_path):
    """Padded embeddings (Qwen's 151665 tokens in 152064 rows) are normal."""
    hf = tmp_path / "hf"
    save_hf_checkpoint(hf, "qwen2", vocab_size=TOKENS + 10)
    assert shoal(["import", "--source", str(hf), "--output_path", str(tmp_path / "ck")]) == 0


@pytest.fixture
def sharded(tmp_path) -> Path:
    hf = tmp_path / "models" / "hf"
    save_hf_checkpoint(hf, "llama", max_shard_size="100KB")
    assert (hf / "model.safetensors.index.json").is_file()
    return hf


def point_index_outside(hf: Path, spelling) -> None:
    """Move the first shard out of the folder and make the index name it there."""
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = hf.parent / "elsewhere.safetensors"
    shutil.move(hf / first, outside)
    index["weight_map"] = {k: (spelling(outside, hf) if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("spelling", [
    lambda outside, hf: "../elsewhere.safetensors",
    lambda outside, hf: str(outside),
    lambda outside, hf: "sub/../../elsewhere.safetensors",
], ids=["dotdot", "absolute", "nested_dotdot"])
def test_index_naming_files_outside_the_folder_is_refused(tmp_path, sharded, capsys, spelling):
    point_index_outside(sharded, spelling)
    assert_refused(tmp_path, sharded, capsys, "model.safetensors.index.json", "outside the model folder")


def test_hub_cache_symlinked_shards_still_import(tmp_path, sharded):
    """The Hugging Face cache keeps shards as symlinks to ../../blobs: a link is not an escape."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in sharded.glob("model-*.safetensors"):
        shutil.move(shard, blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    assert shoal(["import", "--source", str(sharded), "--output_path", str(tmp_path / "ck")]) == 0
