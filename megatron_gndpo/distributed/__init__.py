from megatron_gndpo.distributed.init import ProcessGroups, destroy_parallel, init_parallel, is_rank0

__all__ = ["ProcessGroups", "destroy_parallel", "init_parallel", "is_rank0"]
