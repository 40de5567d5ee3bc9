from megatron_gndpo.config.loader import config_from_dict, config_to_dict, load_config
from megatron_gndpo.config.schema import (
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TeacherConfig,
    check_same_vocabulary,
)

__all__ = [
    "ModelConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig", "RunConfig", "TeacherConfig",
    "check_same_vocabulary", "config_from_dict", "config_to_dict", "load_config",
]
