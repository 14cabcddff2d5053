"""Text generation from shoal checkpoints: KV-cached decoding, sampling, `shoal generate` and `shoal chat`."""
