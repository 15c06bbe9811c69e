"""optbench: AdamW vs Lion vs Sophia vs Schedule-Free on ViT-Tiny, measured honestly."""

__version__ = "0.1.0"
