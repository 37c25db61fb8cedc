"""Compression: progressive distillation of a pretrained LLM into a small student (ERNIE-Tiny stages,\nMinitron-style pruning and the SALT SLM as student inits), on the same Trainer."""
