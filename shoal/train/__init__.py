"""Training: `shoal pretrain` and `shoal finetune` share the loop in `trainer.py`."""
