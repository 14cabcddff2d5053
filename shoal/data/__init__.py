"""Data for training: Megatron `.bin/.idx` datasets, preprocessing, downloads.

`indexed` reads and writes the indexed dataset format, `preprocess` tokenizes JSON Lines into it,
`download` fetches pretraining corpora and instruction sets, `tokenizer` finds the tokenizer.
Submodules are imported where used, so `import shoal.data` stays light.
"""
