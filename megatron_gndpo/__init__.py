"""megatron-gndpo: on-policy distillation with Globally Normalized Distillation Policy Optimization
on megatron-core."""

__version__ = "0.1.0"

# Before anything imports megatron-core: a broken Transformer Engine install must not break megatron's
# local layers (see models/te_support.py).
from megatron_gndpo.models.te_support import guard as _guard_transformer_engine  # noqa: E402

_guard_transformer_engine()
