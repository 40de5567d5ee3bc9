"""megatron-gndpo: on-policy distillation with Globally Normalized Distillation Policy Optimization
on megatron-core."""

__version__ = "0.1.0"
