"""Distillation building blocks shared by the recipes: chunked KD losses, the KD-weight schedule, the frozen
teacher, and the soft-target sources (online teacher, cached soft labels, smoothed one-hot)."""
