"""Judging a checkpoint: mean loss and perplexity on a split of the training data (`shoal eval`)."""
