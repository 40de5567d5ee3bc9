"""Run megatron-core on CPU (gloo) when CUDA is absent.

megatron-core 0.16 hard-wires CUDA in a handful of places that are otherwise device-agnostic:
factory calls with ``device="cuda"`` or ``device=torch.cuda.current_device()``, ``torch.cuda.synchronize()``
around p2p and collectives, and an RNG tracker built on CUDA generators. Rather than forking those
functions, each affected megatron module gets its module-level ``torch`` name rebound to a thin proxy
that maps CUDA devices to the CPU and turns CUDA-only synchronisation into no-ops. Everything else
is forwarded to the real ``torch``, so the code megatron runs is its own.

This module is imported only by :func:`megatron_gndpo.distributed.init.init_parallel` and
:func:`apply` returns immediately when ``torch.cuda.is_available()``: the GPU path never sees it.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like", "ones_like")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by a patched module: the current device is the CPU and stream
    synchronisation is a no-op (gloo collectives are synchronous on CPU)."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def is_current_stream_capturing():
        return False

    @staticmethod
    def current_stream(*_args, **_kwargs):
        return None

    @staticmethod
    def nvtx_range_push(*_args, **_kwargs):
        return None

    @staticmethod
    def nvtx_range_pop(*_args, **_kwargs):
        return None


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by a patched module: tensor factories map CUDA devices to the CPU (and pin nothing)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _factory(fn):
        # pin_memory stages host-to-GPU copies; without an accelerator torch refuses it, and there is no copy
        def wrapped(*args, device=None, pin_memory=False, **kwargs):
            return fn(*args, device=_cpu_device(device), **kwargs)

        wrapped.__name__ = fn.__name__
        return wrapped


class CpuRNGStatesTracker:
    """Named CPU-generator states with megatron's ``CudaRNGStatesTracker`` interface.

    megatron forks the "model-parallel-rng" state around dropout in TP regions and around
    weight init on GPU; on CPU the same bookkeeping is kept on ``torch``'s default generator.
    """

    def __init__(self, *_args, **_kwargs):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name!r} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


# Modules whose functions create tensors on "cuda" or call torch.cuda.* directly; each entry says why.
_PATCHED_MODULES = (
    # rotary inv_freq / seq tensors on torch.cuda.current_device()
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # context parallelism: this rank's chunk indices built in pinned memory, then moved with .cuda()
    "megatron.core.models.common.embeddings.rope_utils",
    # ColumnParallel/RowParallel weights and all-gather buffers on the current CUDA device
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    # GPTModel / LanguageModule: loss buffers and embedding-group all-reduce on CUDA
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    # schedules: total_num_tokens = torch.zeros(..., device="cuda")
    "megatron.core.pipeline_parallel.schedules",
    # p2p: shape tensors on the CUDA device, torch.cuda.synchronize() after batched isend/irecv
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    # DDP grad buffers on torch.cuda.current_device(), CUDA streams for overlap
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    # optimizer: found_inf / grad-norm scalars created with device="cuda"
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    # dist_checkpointing: preload/exchange buffers on the CUDA device
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # torch.cuda.synchronize() before/after tensor preload and in the fully-parallel wrappers
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)

_applied = False


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def apply() -> bool:
    """Patch megatron-core for CPU execution if (and only if) CUDA is unavailable.

    Returns True if the patches are active. Idempotent.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    proxy = _CpuTorch()
    for name in _PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:  # moved or gone in a newer megatron-core: nothing there to patch
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = proxy

    # Tensor.cuda() is a method, so no module proxy reaches it: megatron calls it to move the tied
    # embedding before its PP all-reduce (language_module), on reloaded optimizer state, and on
    # parameter hashes. On a CUDA-less build it can only raise, so the CPU is "the" device.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    from megatron.core.tensor_parallel import random as mcore_random

    # model_parallel_cuda_manual_seed() creates CUDA generator states; install the CPU tracker
    # first so that it re-seeds this one instead.
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.torch = proxy

    from megatron.core.optimizer import optimizer as mcore_optimizer

    # clip_grad_by_total_norm_fp32 asserts grad.type() == "torch.cuda.FloatTensor" before scaling;
    # the CPU version scales the same fp32 grads in place. (The distributed optimizer is not
    # patched: it is CUDA-only throughout, so the config refuses it on CPU instead.)
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _applied = True
    return True
