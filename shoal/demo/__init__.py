"""The embedded default that `shoal demo` runs end to end on CPU.

* `corpus` writes a small invented world as a pretraining corpus (JSONL, English and Traditional
  Chinese) and an instruction task about it (`training/validation/test.jsonl`);
* `tokenizer` trains the byte-level BPE shipped in `assets/tokenizer/` (Llama 3 special tokens and
  chat template);
* `tiny_model` writes a randomly initialised tiny Llama 3 as a Hugging Face checkpoint, the model
  the demo imports.
"""
