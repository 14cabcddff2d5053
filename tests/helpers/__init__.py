"""What the tests share (import as `tests.helpers.<module>`; fixtures are in tests/conftest.py).

hf_models            tiny Hugging Face models per family, saved checkpoints, the training tests' small Llama
tokenizers           tiny word-level and byte-level BPE tokenizers with Llama-3-like chat templates
cli                  `shoal ...` in this process or as a child process
training             training assets, a small run's arguments, metrics and DCP readers
peft_twins           a tiny HF model's shoal and PEFT twins, adapter copying
distributed          run a function in N processes (gloo on CPU, NCCL on GPUs), as torchrun does
distributed_workers  a few training steps on one parallel layout, and the one-process oracle
slurm_cluster        a private two-node Slurm cluster on localhost
"""
