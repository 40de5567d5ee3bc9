"""Sampling, scoring and training with images on the vision-language models (models/vlm.py), against
full recomputation, transformers' ``InternVLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
and the single-rank layout (the tiny random models of test_vlm.py; nothing downloaded). Plus the
teacher / student image-layout check."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_gndpo.data.images import ImageRef
from megatron_gndpo.data.vision import ImageInputs, VisionProcessor
from megatron_gndpo.trainer.images import check_same_image_layout
from tests import common
from tests.distributed.test_vlm import (FAMILIES, FROZEN, IMAGE_TOKEN, TEXT_FROM, _hf_model, hf_logits, image_inputs,
                                       image_tokens)
from tests.harness import relayout, run_distributed
from tests.unit.test_vision_data import PROMPT, _png, _tokenizer

NEW_TOKENS, VOCAB = 6, 64
LAYOUTS = ((1, 1), (2, 1), (1, 2))
# two images of different sizes, and another one (InternVL: tiles; Qwen2.5-VL: patch grids)
SIZES = {"internvl": ((3, 1), (1,)), "qwen2_5_vl": (((1, 8, 6), (1, 2, 4)), ((1, 4, 4),))}


def _prompts(family: str = "internvl"):
    """Rows of different lengths; the shortest (text only) is shorter than where the others' images
    start, so the staggered decode forces image tokens. Row 0: two images of different sizes; rows 1
    and 3: one image, the same ``ImageInputs`` object (a prompt's two samples); row 2: text."""
    g = torch.Generator().manual_seed(2)
    start, image, end = image_tokens(family)

    def text(n):
        return torch.randint(TEXT_FROM[family], VOCAB, (n,), generator=g).tolist()

    two, one = (image_inputs(family, g, sizes) for sizes in SIZES[family])
    a, b = ([start] + [image] * n + [end] for n in two.tokens_per_image)
    c = [start] + [image] * one.tokens_per_image[0] + [end]
    prompts = [text(3) + a + text(2) + b + text(1), text(5) + c + text(2), text(2)]
    return prompts + [prompts[1]], [two, one, None, one]


def _sharp_hf_model(family: str = "internvl"):
    """test_vlm.py's model with every matrix 8x larger: at transformers' initial scale (std 0.02) the
    greedy continuation repeats the last prompt token whatever came before, images included, and a
    sampler that dropped the images would pass (the test checks that they matter)."""
    hf = _hf_model(family=family)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return hf


def _greedy(groups, logits_shard):
    from megatron_gndpo.rollout.sampling import vocab_parallel_sample

    b = logits_shard.shape[0]
    return vocab_parallel_sample(logits_shard, rows=torch.zeros(b), position=torch.zeros(b), seed=0, group=groups.tp,
                                 temperature=0.0, vocab_size=VOCAB)


def _recompute(model, groups, prompt, images):
    """Greedy continuation of one prompt by full forwards (its images in every micro-batch)."""
    from megatron_gndpo.trainer.images import micro_batch_images
    from megatron_gndpo.trainer.megatron_glue import run_schedule

    t = torch.tensor([prompt])
    for _ in range(NEW_TOKENS):
        mb = {**common.microbatch(t), **micro_batch_images([images], t.device, pixels=groups.is_first_stage)}
        got = run_schedule(model, [mb], forward_only=True,
                           collect_fn=lambda lg, mb: {"nxt": _greedy(groups, lg[:, -1])})
        nxt = got[0]["nxt"] if got else torch.zeros(1, dtype=torch.long)
        if groups.pp_size > 1:
            dist.broadcast(nxt, src=dist.get_global_rank(groups.pp, groups.pp_size - 1), group=groups.pp)
        t = torch.cat([t, nxt[:, None]], 1)
    return t[0, len(prompt):].tolist()


def _rollout_score_train(groups, family):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_gndpo.models.vlm import build_vlm_model, load_vlm_hf_weights
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.rollout.generator import SamplingParams, generate
    from megatron_gndpo.trainer.batches import sequences_from_rollout, split_rows
    from megatron_gndpo.trainer.images import attach_images
    from megatron_gndpo.trainer.megatron_glue import TokenLoss, forward_outputs, run_schedule

    hf = _sharp_hf_model(family)
    prompts, images = _prompts(family)
    out = {}
    for tp, pp in LAYOUTS:
        groups = relayout(tp, pp)
        model = build_vlm_model(hf.config, common.parallel(tp, pp), common.FP32, pre_process=groups.is_first_stage,
                                     post_process=groups.is_last_stage)
        load_vlm_hf_weights(model, hf.state_dict(), hf.config)
        model.config.calculate_per_token_loss = True  # as build_student: the loss below is already normalised
        rollout = generate(model, prompts, torch.arange(4), SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS),
                           groups=groups, vocab_size=VOCAB, seed=0, max_sequence_length=128, images=images)
        res = {"cached": rollout.responses(), "tokens": rollout.tokens,
               "recomputed": [_recompute(model, groups, p, im) for p, im in zip(prompts[:3], images[:3])]}
        if (tp, pp) == (1, 1):  # the same prompts without their images: another continuation
            res["blind"] = generate(model, prompts, torch.arange(4), SamplingParams(temperature=0.0,
                                                                                   max_new_tokens=NEW_TOKENS),
                                    groups=groups, vocab_size=VOCAB, seed=0, max_sequence_length=128).responses()

        # the rollout as the trainer scores and trains on it: two micro-batches of two rows each
        microbatches = split_rows(sequences_from_rollout(rollout), 2)
        attach_images(microbatches, images, groups)
        res["has_pixels"] = ["pixel_values" in mb for mb in microbatches]
        if (tp, pp) == (2, 1):
            res["logp"] = forward_outputs(model, microbatches, lambda lg, mb: {
                "logp": vocab_parallel_logprobs(lg, mb["labels"], group=groups.tp, vocab_size=VOCAB)})["logp"]
        # one training step as Student.update runs it: megatron's DDP, finalize_model_grads, a loss already
        # divided by the step's token count (the DP replicas of (1, 1) hold the same rows: their sum is dp x)
        model.config.finalize_model_grads_func = finalize_model_grads
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        ddp.zero_grad_buffer()
        n_tokens = sum(int(mb["mask"].sum()) for mb in microbatches)

        loss = TokenLoss(lambda lg, mb: {"logp": vocab_parallel_logprobs(lg, mb["labels"], group=groups.tp,
                                                                         vocab_size=VOCAB)},
                         lambda tokens, mb: (-(tokens["logp"] * mb["mask"]).sum() / n_tokens, {}))
        run_schedule(ddp, microbatches, loss=loss, forward_only=False)
        if model.vision is not None:  # what trains of the vision side: the projector (Qwen2.5-VL's patch merger)
            res["projector_grad"] = {n: p.main_grad / groups.dp_size
                                     for n, p in model.vision.named_parameters() if p.requires_grad}
            res["tower_grads"] = [(p.grad, getattr(p, "main_grad", None))
                                  for p in model.vision.parameters() if not p.requires_grad]
        out[(tp, pp)] = res
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_rollout_scoring_and_training_with_images(family):
    prompts, images = _prompts(family)
    ranks = run_distributed(_rollout_score_train, 2, args=(family,), timeout_s=240)
    for rank, per_layout in enumerate(ranks):
        for layout, res in per_layout.items():
            where = f"{family} rank {rank} (TP, PP)={layout}"
            # KV-cached greedy with images equals full recomputation, rows of every kind
            assert res["cached"][:3] == res["recomputed"], where
            assert res["cached"][3] == res["cached"][1], where  # the shared ImageInputs
            if "blind" in res:  # the images matter; the text-only row is the same without them
                assert [res["blind"][b] != res["cached"][b] for b in range(3)] == [True, True, False], where
            assert res["has_pixels"] == [rank == 0 or layout[1] == 1] * 2, where  # first stage only
            if "projector_grad" in res:  # first stage: the projector learns, the frozen tower does not
                assert res["tower_grads"] and all(g is None and main is None for g, main in res["tower_grads"]), where
                ref = ranks[0][(1, 1)]["projector_grad"]
                assert all(g.abs().max() > 0 for g in ref.values())
                assert sorted({n.removeprefix("visual.").split(".")[0] for n in ref}) == FROZEN[family][1], where
                for name, g in res["projector_grad"].items():
                    torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=f"{where} {name}")

    # the scoring path at TP 2 equals transformers' log-probs of the same tokens and images
    hf = _sharp_hf_model(family)
    tokens, logp = ranks[0][(2, 1)]["tokens"], ranks[0][(2, 1)]["logp"]
    sampled_image_tokens = 0
    for b, (prompt, im) in enumerate(zip(prompts, images)):
        n = len(prompt) + NEW_TOKENS
        # a sampled image-token id stays a token for us; transformers would read it as an image, so its
        # log-probs are compared up to that token's own
        hits = (tokens[b, len(prompt):n] == hf.config.image_token_id).nonzero()
        if len(hits):
            n, sampled_image_tokens = len(prompt) + int(hits[0]) + 1, sampled_image_tokens + 1
        logits = hf_logits(hf, tokens[b:b + 1, :n - 1], im)
        want = torch.log_softmax(logits[0].double(), -1).gather(-1, tokens[b, 1:n, None])[:, 0]
        torch.testing.assert_close(logp[b, :n - 1].double(), want, rtol=1e-4, atol=1e-4, msg=f"{family} row {b}")
    # (the Qwen2.5-VL model samples it in rows 1 and 3: the rollout above equals full recomputation across it)
    assert (sampled_image_tokens > 0) == (family == "qwen2_5_vl"), sampled_image_tokens
    for rank in ranks[1:]:
        assert torch.equal(rank[(2, 1)]["logp"], logp)


def _processor(**image_processor):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    seq = image_processor.pop("image_seq_length", 4)
    settings = {"size": {"height": 28, "width": 28}, "max_patches": 6, **image_processor}
    return VisionProcessor("internvl", GotOcr2ImageProcessorPil(**settings),
                           _tokenizer("internvl"), image_seq_length=seq)


def test_teacher_must_see_the_students_image_layout():
    messages, images = [{"role": "user", "content": PROMPT}], [ImageRef(_png(40, 90, 0), 40, 90)]
    student = _processor()
    check_same_image_layout(student, _processor(), messages, images)
    with pytest.raises(ValueError, match="row 7: teacher and student processors write different prompt tokens.*"
                                         "'</img>', student '<IMG_CONTEXT>'"):
        check_same_image_layout(student, _processor(image_seq_length=2), messages, images, where="row 7")
    with pytest.raises(ValueError, match="different prompt tokens"):  # fewer tiles: fewer image tokens
        check_same_image_layout(student, _processor(max_patches=1), messages, images)
    with pytest.raises(ValueError, match="different pixel values"):
        check_same_image_layout(student, _processor(image_mean=[0.5, 0.5, 0.5]), messages, images)


def test_merge_reads_only_the_prompts_image_tokens():
    """A response that samples the image token id keeps it as a token when the rows' image-token
    counts are given; without them it is a count error, as in transformers."""
    from megatron_gndpo.models.vlm import VisionLanguageModel

    vlm = VisionLanguageModel(torch.nn.Identity(), None, IMAGE_TOKEN)
    ids = torch.tensor([[1, IMAGE_TOKEN, IMAGE_TOKEN, 2, IMAGE_TOKEN], [1, 2, IMAGE_TOKEN, 3, 4]])
    embeds, features = torch.randn(5, 2, 3), torch.randn(2, 3)  # [seq, batch, h]; row 0's two image tokens
    merged = vlm.merge(ids, embeds, features, torch.tensor([2, 0]))
    want = embeds.clone()
    want[1:3, 0] = features
    assert torch.equal(merged, want)
    with pytest.raises(ValueError, match="the batch has 4 image tokens but its images make 2 image embeddings"):
        vlm.merge(ids, embeds, features)


def test_attach_images_follows_row_ids_on_the_first_stage_only():
    from types import SimpleNamespace

    from megatron_gndpo.trainer.images import attach_images

    a = ImageInputs(torch.full((3, 3, 2, 2), 1.0), [8, 4], tiles_per_image=[2, 1])
    b = ImageInputs(torch.full((1, 3, 2, 2), 2.0), [4], tiles_per_image=[1])
    per_row = [a, None, b, a]
    microbatches = [{"tokens": torch.zeros(2, 4, dtype=torch.long), "row_ids": torch.tensor(rows)}
                    for rows in ([2, 1], [3, 0])]  # rows out of order, as token-budget grouping makes them
    attach_images(microbatches, per_row, SimpleNamespace(is_first_stage=True))
    first, second = microbatches
    assert first["pixel_values"][:, 0, 0, 0].tolist() == [2.0] and first["row_image_tokens"].tolist() == [4, 0]
    assert first["image_tiles"].tolist() == [1] and first["image_tokens"].tolist() == [4]
    # rows 3 and 0 share a's object (two samples of a prompt): its 3 tiles once, each image named twice
    assert second["pixel_values"].shape[0] == 3 and second["row_image_tokens"].tolist() == [12, 12]
    assert second["image_source"].tolist() == [0, 1, 0, 1]
    assert second["image_tiles"].tolist() == [2, 1, 2, 1] and second["image_tokens"].tolist() == [8, 4, 8, 4]
    later = [{"tokens": torch.zeros(2, 4, dtype=torch.long), "row_ids": torch.tensor([0, 1])}]
    attach_images(later, per_row, SimpleNamespace(is_first_stage=False))
    assert set(later[0]) == {"tokens", "row_ids"}
