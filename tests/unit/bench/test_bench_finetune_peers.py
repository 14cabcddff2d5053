"""bench/finetune.py's Liger-Kernel peer patches transformers for its own variant only.

`apply_liger_kernel_to_llama` replaces module globals of transformers' Llama code (and the causal LM's
forward); left in place, every variant after `hf_liger` in the same process would measure Liger,
not plain transformers. Liger's kernels need Triton and a GPU, so a stand-in with the same patching
contract is installed as `liger_kernel.transformers`; the check is that the patch is in force while
the variant runs and gone after it, also when the variant fails."""
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import finetune  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

NAMES = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")


@pytest.fixture
def fake_liger(monkeypatch):
    def apply_liger_kernel_to_llama(**flags):
        assert flags["fused_linear_cross_entropy"] and not flags["cross_entropy"]
        for name in NAMES:
            setattr(modeling_llama, name, f"liger {name}")
        modeling_llama.LlamaForCausalLM.forward = "liger forward"

    package = types.ModuleType("liger_kernel")
    module = types.ModuleType("liger_kernel.transformers")
    module.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)


@pytest.mark.parametrize("fails", [False, True])
def test_liger_patch_lasts_for_its_variant_only(fake_liger, fails):
    before = {name: getattr(modeling_llama, name) for name in NAMES}
    forward = modeling_llama.LlamaForCausalLM.forward
    seen = {}

    def variant():
        seen.update({name: getattr(modeling_llama, name) for name in NAMES})
        seen["forward"] = modeling_llama.LlamaForCausalLM.forward
        if fails:
            raise RuntimeError("out of memory")
        return "ran"

    run = finetune.with_liger(variant)
    if fails:
        with pytest.raises(RuntimeError):
            run()
    else:
        assert run() == "ran"
    assert seen == {**{name: f"liger {name}" for name in NAMES}, "forward": "liger forward"}
    assert {name: getattr(modeling_llama, name) for name in NAMES} == before
    assert modeling_llama.LlamaForCausalLM.forward is forward

