"""Greedy evaluation on held-out prompts: the trainer's validation, the demo scripts, and
``megatron-gndpo eval`` (:func:`evaluate_checkpoint`), which scores a saved checkpoint's student."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_gndpo.config.schema import RolloutConfig, RunConfig
from megatron_gndpo.distributed.collectives import all_reduce
from megatron_gndpo.distributed.init import ProcessGroups
from megatron_gndpo.rollout.generator import SamplingParams, generate
from megatron_gndpo.trainer.dumps import response_records, write_gathered
from megatron_gndpo.trainer.images import sampler_images
from megatron_gndpo.trainer.rewards import REWARD_KEYS


def sampling_params(rollout: RolloutConfig, tokenizer) -> SamplingParams:
    """The rollout's sampling settings, with the tokenizer's end-of-response and padding ids."""
    from megatron_gndpo.data.tokenizer import eos_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                          max_new_tokens=rollout.max_new_tokens, eos_token_ids=eos_ids(tokenizer), pad_token_id=pad)


@torch.no_grad()
def greedy_eval(model, dataset, tokenizer, reward_fn, sampling: SamplingParams, *, groups: ProcessGroups,
                vocab_size: int, max_sequence_length: int, limit: int,
                dump_to: Optional[Path] = None) -> Dict[str, float]:
    """Mean reward and accuracy of greedy responses to the first ``limit`` prompts of ``dataset``,
    split over data-parallel ranks and summed back: ``val/reward``, ``val/acc``, and the same per
    ``data_source`` of the rows that name one (``val/<data_source>/reward``, ...). ``dump_to``: a
    JSONL file that receives every response (see ``dumps.py``)."""
    n = min(limit, len(dataset))
    mine = list(range(groups.dp_rank, n, groups.dp_size))
    # every rank holds the whole dataset, so all agree on the sources without exchanging them
    sources = sorted({dataset.rows[i].data_source for i in range(n)} - {""})
    # row 0: every prompt; row 1 + k: the prompts of sources[k]. Columns: count, reward, accuracy.
    sums = torch.zeros((1 + len(sources), 3), dtype=torch.float64, device=groups.device)
    records = []
    if mine:
        images = [dataset.image_inputs(i) for i in mine]
        rollout = generate(model, [dataset.prompt_ids(i) for i in mine], torch.tensor(mine, device=groups.device),
                           dataclasses.replace(sampling, temperature=0.0), groups=groups, vocab_size=vocab_size,
                           seed=0, max_sequence_length=max_sequence_length,
                           **sampler_images(images))
        texts = tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
        scored = [reward_fn(t, dataset.rows[i].ground_truth) for t, i in zip(texts, mine)]
        sums[0] += torch.tensor([len(mine), sum(s["reward"] for s in scored), sum(s["acc"] for s in scored)],
                                dtype=torch.float64, device=groups.device)
        for i, s in zip(mine, scored):
            if dataset.rows[i].data_source:
                sums[1 + sources.index(dataset.rows[i].data_source)] += torch.tensor(
                    [1.0, s["reward"], s["acc"]], dtype=torch.float64, device=groups.device)
        if dump_to is not None:
            rows = [dataset.rows[i] for i in mine]
            records = response_records(tokenizer, [dataset.prompt_ids(i) for i in mine], rollout.responses(), mine,
                                       {k: [s[k] for s in scored] for k in REWARD_KEYS},
                                       data_source=[r.data_source for r in rows],
                                       ground_truth=[r.ground_truth for r in rows])
    sums = all_reduce(sums, dist.ReduceOp.SUM, groups.dp).tolist()
    metrics = {"val/reward": sums[0][1] / sums[0][0], "val/acc": sums[0][2] / sums[0][0]}
    for source, (count, reward, acc) in zip(sources, sums[1:]):
        metrics.update({f"val/{source}/reward": reward / count, f"val/{source}/acc": acc / count})
    if dump_to is not None and groups.writes_rows:
        write_gathered(dump_to, records, groups.dp)
    return metrics


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str, *, limit: Optional[int] = None) -> Dict[str, Any]:
    """Collective: greedy validation of the student weights in ``checkpoint`` (a step checkpoint, or a
    checkpoint directory whose ``latest`` names one; any TP x PP) on ``data.val_files``, the first
    ``limit`` prompts (all by default), with the run's tokenizer, reward and rollout settings. Returns
    the metrics with what was evaluated; builds no optimizer and no teacher. A vision-language student
    (a training checkpoint of an InternVL run) sees the images with ``data.images=process``."""
    from megatron_gndpo.checkpoint.dist_ckpt import (TOKENIZER_DIR, check_architecture, load_model_weights,
                                                     read_meta, resolve_checkpoint)
    from megatron_gndpo.checkpoint.vision import is_vision_language
    from megatron_gndpo.data.vision import load_vision_processor
    from megatron_gndpo.models.vlm import load_vlm_checkpoint
    from megatron_gndpo.config.schema import check_same_vocabulary
    from megatron_gndpo.data.prompts import PromptDataset
    from megatron_gndpo.data.tokenizer import check_checkpoint_tokenizers, load_tokenizer
    from megatron_gndpo.distributed.init import init_parallel
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.teacher import freeze
    from megatron_gndpo.rewards import get_reward
    from megatron_gndpo.trainer.preflight import agree

    groups = init_parallel(cfg.parallel, seed=cfg.seed)
    data = cfg.data

    def open_everything():
        if not data.val_files:
            raise ValueError("data.val_files is empty: there is nothing to evaluate on")
        path = resolve_checkpoint(checkpoint)
        check_architecture(path, cfg.model, "student")
        tokenizer = load_tokenizer(data.tokenizer)
        check_checkpoint_tokenizers(tokenizer, data.tokenizer, {"--checkpoint": str(path)})
        # a vision-language student's processor lays the images out, as in training (trainer/setup.py)
        processor = load_vision_processor(str(path / TOKENIZER_DIR), tokenizer) \
            if data.images == "process" and is_vision_language(path) else None
        dataset = PromptDataset(data.val_files, tokenizer, max_prompt_length=data.max_prompt_length,
                                images=data.images, overlong=data.overlong_prompts, processor=processor)
        # the trainer's validation takes the vocabulary the student shares with its teacher; so does this
        vocab_size = check_same_vocabulary(len(tokenizer), cfg.model, cfg.teacher.model)
        return path, tokenizer, dataset, vocab_size, get_reward(data.reward)

    path, tokenizer, dataset, vocab_size, reward_fn = agree("preparing the evaluation", open_everything)
    stage = dict(pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
    if is_vision_language(path):
        model = freeze(load_vlm_checkpoint(path, cfg.parallel, cfg.precision, role="student", **stage))
    else:
        model = freeze(build_gpt_model(cfg.model, cfg.parallel, cfg.precision, **stage))
        load_model_weights(model, path, cfg.model, "student")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    metrics = greedy_eval(model, dataset, tokenizer, reward_fn, sampling_params(cfg.rollout, tokenizer),
                          groups=groups, vocab_size=vocab_size, max_sequence_length=cfg.model.max_position_embeddings,
                          limit=n)
    return {"checkpoint": str(path), "step": read_meta(path).get("step"), "val_files": list(data.val_files),
            "prompts": n, "dropped_overlong_prompts": dataset.dropped, **metrics}


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """``payload`` as JSON at ``path`` (its directory created), replaced atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
