"""Hugging Face <-> megatron checkpoint conversion; the implementation is
``megatron_gndpo.checkpoint.convert`` (also ``megatron-gndpo convert``)."""
