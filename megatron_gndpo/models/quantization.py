"""Post-training quantisation of the frozen teacher with NVIDIA ModelOpt, and what it costs in log-probs.

``teacher.quantize: fp8`` applies ModelOpt's FP8 recipe (E4M3, one scale per tensor for the weight
and for the input of every linear layer of the decoder), calibrates the input scales by their max
over calibration batches, then compresses: the weights are stored as FP8, half the memory of a BF16
teacher's linear layers. The embedding and the LM head (``output_layer``: ModelOpt's recipe leaves
it out, as megatron keeps the LM head in high precision) stay in the teacher's precision, and so does
the log-ratio computed from its logits. ModelOpt's megatron-core plugin makes each scale the max over
the data- and tensor-parallel ranks, so every replica scores with the same teacher.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from megatron_gndpo.distributed.collectives import all_reduce

RECIPES = {"fp8": "FP8_DEFAULT_CFG"}


def quantize_teacher(model: torch.nn.Module, method: str,
                     calibrate: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """``model`` quantised with ModelOpt's ``method`` recipe (see :data:`RECIPES`), its scales
    calibrated by ``calibrate(model)`` (forward passes over calibration data, through the pipeline
    schedule when the model is one stage of several), and its weights compressed."""
    if method not in RECIPES:
        raise ValueError(f"unknown teacher quantisation {method!r}; known: {', '.join(RECIPES)}")
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ImportError(f"teacher.quantize={method!r} needs NVIDIA ModelOpt: pip install nvidia-modelopt") from e
    model = mtq.quantize(model, getattr(mtq, RECIPES[method]), calibrate)
    mtq.compress(model)
    return model


def logprob_error(reference: torch.Tensor, quantized: torch.Tensor, mask: torch.Tensor,
                  group: Optional[dist.ProcessGroup]) -> Dict[str, float]:
    """How far the quantised teacher's token log-probs are from the unquantised ones, over the
    masked tokens of every rank of ``group`` (data parallelism):
    ``mean |lp_q - lp_ref|``, ``max |lp_q - lp_ref|`` and ``mean (lp_q - lp_ref)`` (a bias)."""
    diff = (quantized.double() - reference.double())[mask.bool()]
    sums = torch.stack([diff.abs().sum(), diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64,
                                                                    device=diff.device)])
    worst = diff.abs().max() if diff.numel() else diff.new_zeros(())
    all_reduce(sums, group=group)
    all_reduce(worst, dist.ReduceOp.MAX, group)
    n = max(sums[2].item(), 1.0)
    return {"abs_mean": sums[0].item() / n, "abs_max": worst.item(), "bias": sums[1].item() / n,
            "tokens": sums[2].item()}
