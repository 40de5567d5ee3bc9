import pytest
import torch

from megatron_gndpo.models.quantization import logprob_error, quantize_teacher


def test_logprob_error_counts_only_masked_tokens():
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -1.5]])
    quant = torch.tensor([[-1.1, -1.8, -7.0], [-0.5, -9.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    got = logprob_error(ref, quant, mask, group=None)
    diffs = [-0.1, 0.2, 0.0, 0.5]  # the masked-out -4.0 and 0.0 do not count
    assert got["tokens"] == 4
    assert got["abs_mean"] == pytest.approx(sum(abs(d) for d in diffs) / 4)
    assert got["abs_max"] == pytest.approx(0.5)
    assert got["bias"] == pytest.approx(sum(diffs) / 4)


def test_unknown_quantisation_is_named():
    with pytest.raises(ValueError, match="unknown teacher quantisation 'int3'; known: fp8"):
        quantize_teacher(torch.nn.Linear(2, 2), "int3", lambda m: None)
