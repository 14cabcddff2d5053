"""shoal's checkpoint format (DESIGN §3): DCP weights keyed by HF names, JSON metadata, atomic publish."""
