"""shoal: import, continually pretrain, fine-tune and export Hugging Face language models."""

__version__ = "0.1.0"
