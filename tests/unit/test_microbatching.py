"""Token-budget micro-batches (trainer/batches.py): first-fit-decreasing grouping, packed rows, and the
row bookkeeping (``row_ids``) that puts per-row results back in order."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_gndpo.trainer.batches import (
    attach,
    first_fit_decreasing,
    form_microbatches,
    gather_rows,
    microbatch_cost,
    mini_batches,
    row_lengths,
)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("multiple", [1, 16])
def test_first_fit_decreasing_respects_the_budget_and_places_every_row_once(pack, multiple):
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(_ceil(max(lengths), multiple), 1200)
        groups = first_fit_decreasing(lengths, budget, pack=pack, multiple=multiple)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert g == sorted(g)
            assert microbatch_cost([lengths[i] for i in g], pack=pack, multiple=multiple) <= budget
        assert groups == first_fit_decreasing(list(lengths), budget, pack=pack, multiple=multiple)  # deterministic


def _ceil(n, m):
    return -(-n // m) * m


def test_first_fit_decreasing_known_grouping():
    # decreasing: 9 (row 2), 6 (row 0), 5 (row 3), 3 (row 1), 1 (row 4); padded cost = rows x longest
    assert first_fit_decreasing([6, 3, 9, 5, 1], 12, pack=False) == [[2], [0, 3], [1, 4]]
    # packed cost = sum: 9 + 3 -> 12; 6 + 5 + 1 -> 12
    assert first_fit_decreasing([6, 3, 9, 5, 1], 12, pack=True) == [[1, 2], [0, 3, 4]]
    # a row over the budget still forms a micro-batch of its own
    assert first_fit_decreasing([20, 2], 10, pack=True) == [[0], [1]]


def _batch(lengths, width, pad=0):
    b = len(lengths)
    tokens = torch.randint(1, 50, (b, width))
    mask = torch.zeros(b, width, dtype=torch.bool)
    for r, n in enumerate(lengths):
        mask[r, max(n - 3, 0):n] = n > 0
        tokens[r, n:] = pad
    return {"tokens": tokens, "position_ids": torch.arange(width).expand(b, width).contiguous(),
            "labels": tokens.roll(-1, 1), "mask": mask, "extra": torch.arange(b) * 10}


@pytest.mark.parametrize("pack", [False, True])
def test_microbatches_keep_mini_batch_boundaries_and_round_trip(pack):
    torch.manual_seed(0)
    lengths = [5, 17, 3, 30, 8, 8, 1, 22, 12, 4, 9, 16]
    batch = _batch(lengths, 32)
    assert row_lengths(batch["mask"]).tolist() == lengths
    mbs = form_microbatches(batch, mini_batches=3, micro_batch_size=2, max_tokens=40, pack=pack, multiple=4,
                            pad_token_id=0)
    groups = mini_batches(mbs, 3)
    for i, group in enumerate(groups):  # each optimizer step holds exactly its 4 rows
        assert sorted(int(r) for mb in group for r in mb["row_ids"]) == list(range(4 * i, 4 * i + 4))
    for mb in mbs:
        n = mb["tokens"].numel()
        assert n <= 40 and n % 4 == 0
        assert torch.equal(mb["extra"], batch["extra"][mb["row_ids"]])  # extra per-row keys follow their rows
        width = mb["mask"].shape[1]
        assert torch.equal(mb["labels"], batch["labels"][mb["row_ids"], :width])
        if pack:
            assert mb["tokens"].shape[0] == 1
            for r, row in enumerate(mb["row_ids"].tolist()):
                n = lengths[row]  # the packed row holds each response's tokens at unpack
                assert torch.equal(mb["tokens"][0, mb["unpack"][r, :n]], batch["tokens"][row, :n])
                assert torch.equal(mb["position_ids"][0, mb["unpack"][r, :n]], torch.arange(n))
    per_token = torch.randn(12, 32)
    per_token[batch["mask"].logical_not()] = 0
    per_row = torch.randn(12)
    attach(mbs, score=per_token, seq=per_row)
    back = gather_rows([mb["score"] for mb in mbs], mbs)
    assert torch.equal(back[:, :max(lengths)], per_token[:, :max(lengths)])
    assert torch.equal(gather_rows([mb["seq"] for mb in mbs], mbs), per_row)


def test_without_a_budget_the_micro_batches_are_today_s():
    batch = _batch([5, 17, 3, 30, 8, 8, 1, 22], 32)
    mbs = form_microbatches(batch, mini_batches=2, micro_batch_size=2, max_tokens=None, pack=False, multiple=1,
                            pad_token_id=0)
    assert [mb["row_ids"].tolist() for mb in mbs] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(mb["tokens"].shape == (2, 32) for mb in mbs)


@pytest.mark.parametrize("overrides,reason", [
    (["trainer.max_tokens_per_microbatch=10"], "must hold the longest row"),  # 8 + 4 - 1 = 11 positions
    (["trainer.pack_sequences=true", "data.images=process"], "no place for image"),
    (["trainer.pack_sequences=true", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
     "needs Transformer Engine"),
])
def test_config_refuses_what_packing_cannot_do(tmp_path, overrides, reason):
    from tests.trainer_setup import run_config

    with pytest.raises(ValueError, match=reason):
        run_config(tmp_path, overrides)
    run_config(tmp_path, ["trainer.max_tokens_per_microbatch=11", "trainer.pack_sequences=true"])
