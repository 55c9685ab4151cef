"""Accumulator-aware fine-tuning (QAT through the torch bridge) and AXE post-training quantization."""
