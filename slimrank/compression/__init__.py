"""Distillation, pruning, int8 quantization and the accuracy gate."""
