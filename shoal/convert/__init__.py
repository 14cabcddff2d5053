"""Hugging Face <-> shoal checkpoint conversion: `shoal import` (stage 1) and `shoal export` (stage 4).

`adapters` holds the one two-way key map per model family; `safetensors_io` and `streaming` move
weights a tensor (or a bounded group) at a time; `importer` and `exporter` are the two commands.
"""
