"""A student and a teacher of one tokenizer and different embedding sizes (Qwen2.5-1.5B's 151936 rows and
Qwen2.5-7B's 152064, scaled down to 1000 and 1024 rows with one 1000-token tokenizer): the trainer
accepts them, and every vocab-parallel op on either model masks the ids at or beyond the shared
vocabulary, with each model's own shard widths (at TP=2: 504 and 512 columns per rank)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.harness import run_distributed
from tests.trainer_setup import ARCH, TOKENIZER, run_config, write_prompts

pytestmark = pytest.mark.distributed

TOKENS = 1000
SIZES = (1000, 1024)


def _make_workdir(groups, tmp: str):
    """Harness function (1 rank): the 1000-token tokenizer (the arithmetic one and 985 added tokens),
    another of the same size with two ids swapped, prompts, and random student / teacher checkpoints
    of 1000 and 1024 rows with the first tokenizer, and one of 1024 rows with the second."""
    from megatron_gndpo.checkpoint.dist_ckpt import save_model_weights
    from megatron_gndpo.data.tokenizer import load_tokenizer
    from megatron_gndpo.models.provider import build_gpt_model

    tmp = Path(tmp)
    extra = [f"<t{i}>" for i in range(TOKENS - 15)]
    for name, added in (("tokenizer", extra), ("swapped_tokenizer", [extra[1], extra[0], *extra[2:]])):
        tok = load_tokenizer(TOKENIZER)
        tok.add_tokens(added)
        tok.save_pretrained(str(tmp / name))
    write_prompts(tmp / "train.parquet")
    checkpoints = [(vocab, role, f"{role}_{vocab}", "tokenizer") for vocab in SIZES for role in ("student", "teacher")]
    checkpoints.append((1024, "teacher", "teacher_other_tokenizer", "swapped_tokenizer"))
    for vocab, role, name, tokenizer in checkpoints:
        cfg = _config(tmp, vocab, vocab)
        arch = cfg.model if role == "student" else cfg.teacher.model
        model = build_gpt_model(arch, cfg.parallel, cfg.precision, pre_process=True, post_process=True)
        save_model_weights(model, tmp / name, arch, {"tp": 1, "pp": 1}, tokenizer=tmp / tokenizer)


def _config(tmp, student_vocab, teacher_vocab, overrides=(), teacher_checkpoint=None):
    tmp = Path(tmp)
    arch = dict(ARCH, make_vocab_size_divisible_by=8)
    return run_config(tmp, overrides, model=dict(arch, vocab_size=student_vocab),
                      teacher={"model": dict(arch, hidden_size=48, vocab_size=teacher_vocab),
                               "checkpoint": teacher_checkpoint or str(tmp / f"teacher_{teacher_vocab}")},
                      student_checkpoint=str(tmp / f"student_{student_vocab}"),
                      data={"tokenizer": str(tmp / "tokenizer")})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocabulary")
    run_distributed(_make_workdir, 1, args=(str(tmp),))
    return tmp


def _full_logprobs(model, microbatches, groups, shared):
    """Reference: the sampled-token log-probs from the whole logits (TP shards gathered), masked at ``shared``."""
    import torch.distributed as dist

    from megatron_gndpo.trainer.megatron_glue import run_schedule

    shard = torch.cat([o["logits"] for o in run_schedule(model, microbatches, collect_fn=lambda x, mb: {"logits": x},
                                                         forward_only=True)])
    parts = [torch.empty_like(shard) for _ in range(groups.tp_size)]
    dist.all_gather(parts, shard.contiguous(), group=groups.tp)
    logits = torch.cat(parts, dim=-1).double()
    labels = torch.cat([mb["labels"] for mb in microbatches])
    lp = torch.log_softmax(logits[..., :shared], dim=-1).gather(-1, labels[..., None])[..., 0]
    return lp, shard.shape[-1]


def _run(groups, tmp, tp, student_vocab, teacher_vocab):
    """Scores of fixed token ids (up to the last shared id) by both models, against the gathered-logits
    reference; one training step and one validation, recording every vocab_size the trainer passes."""
    import megatron_gndpo.trainer.trainer as trainer_module
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.rollout import continuous
    from megatron_gndpo.trainer import batches, megatron_glue

    destroy_parallel(destroy_process_group=False)  # the trainer builds the groups from its own config
    cfg = _config(tmp, student_vocab, teacher_vocab, [f"parallel.tensor_model_parallel_size={tp}",
                                                      f"trainer.output_dir={tmp}/run_{tp}_{student_vocab}"])
    trainer = trainer_module.Trainer(cfg)
    g, shared = trainer.groups, trainer.shared_vocab_size
    ids = torch.randint(0, TOKENS, (4, 9), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = TOKENS - 1
    batch = batches.sequences_from_prompts(ids.tolist(), 0, g.device)
    microbatches = batches.split_rows(batch, 2)
    out = {"shared": shared}
    for name, scorer, model, key in (("teacher", trainer.teacher, trainer.teacher.model, "teacher_logprobs"),
                                     ("student", trainer.student, trainer.student.module, "old_logprobs")):
        got = scorer.score(microbatches)[key]
        ref, width = _full_logprobs(model, microbatches, g, shared)
        out[name] = {"error": (got.double() - ref).abs().max().item(), "shard_width": width}

    seen, sampled = [], []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, kwargs["vocab_size"]))
            result = fn(*args, **kwargs)
            if name == "generate":
                sampled.append(int(result.tokens.max()))
            return result
        return wrapped

    # the step samples through rollout_engine, which hands out continuous.generate; the scoring phases
    # read log-probs through the fused LM head, the update through the logits
    with contextlib.ExitStack() as spies:
        for module, name in ((continuous, "generate"), (megatron_glue, "fused_linear_logprobs"),
                             (megatron_glue, "vocab_parallel_logprobs"), (megatron_glue, "vocab_parallel_entropy"),
                             (trainer_module, "greedy_eval")):
            spies.enter_context(mock.patch.object(module, name, spy(name, getattr(module, name))))
        metrics = trainer.train_step()
        trainer.validate()
    out.update(seen=seen, sampled_max=max(sampled), finite=all(math.isfinite(v) for v in metrics.values()))
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("student_vocab,teacher_vocab", [(1000, 1024), (1024, 1000)])
def test_different_embedding_sizes_share_one_vocabulary(workdir, tp, student_vocab, teacher_vocab):
    out = run_distributed(_run, tp, tp=tp, args=(str(workdir), tp, student_vocab, teacher_vocab))
    padded = {v: -(-v // (8 * tp)) * 8 * tp for v in SIZES}
    for rank in out:
        assert rank["shared"] == TOKENS
        assert rank["teacher"]["shard_width"] == padded[teacher_vocab] // tp
        assert rank["student"]["shard_width"] == padded[student_vocab] // tp
        assert rank["teacher"]["error"] < 1e-5 and rank["student"]["error"] < 1e-5
        assert {vocab for _, vocab in rank["seen"]} == {TOKENS}
        assert {name for name, _ in rank["seen"]} == {"generate", "fused_linear_logprobs", "vocab_parallel_logprobs",
                                                     "vocab_parallel_entropy", "greedy_eval"}
        assert rank["sampled_max"] < TOKENS and rank["finite"]


def _refusals(groups, tmp):
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    messages = []
    for cfg in (_config(tmp, 1000, 1024, ["parallel.tensor_model_parallel_size=2", f"trainer.output_dir={tmp}/r1"],
                        teacher_checkpoint=str(Path(tmp) / "teacher_other_tokenizer")),
                _config(tmp, 996, 1024, ["parallel.tensor_model_parallel_size=2", f"trainer.output_dir={tmp}/r2",
                                         "student_checkpoint=null"])):
        destroy_parallel(destroy_process_group=False)
        with pytest.raises(ValueError) as err:
            Trainer(cfg)
        messages.append(str(err.value))
    return messages


def test_another_tokenizer_or_a_too_small_embedding_is_refused_on_every_rank(workdir):
    for wrong_tokenizer, too_small in run_distributed(_refusals, 2, tp=2, args=(str(workdir),)):
        assert f"teacher.checkpoint ({workdir}/teacher_other_tokenizer/tokenizer, 1000 tokens)" in wrong_tokenizer
        assert f"data.tokenizer ({workdir}/tokenizer, 1000 tokens) in its vocabulary" in wrong_tokenizer
        assert "the tokenizer has 1000 tokens but model.vocab_size is 996" in too_small
