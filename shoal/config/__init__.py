"""Typed configuration: one dataclass module per concern (launch, recipe, ...), YAML recipes and flags."""
