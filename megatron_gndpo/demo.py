"""`make demo`: build a TP=2 student and teacher, sample a batch from the student and print the
per-token teacher/student log-ratios that GNDPO whitens.

    torchrun --nproc-per-node 2 -m megatron_gndpo.demo [--config examples/configs/demo.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import torch

from megatron_gndpo.algorithms.advantages import gndpo
from megatron_gndpo.config import load_config
from megatron_gndpo.distributed import destroy_parallel, init_parallel, is_rank0
from megatron_gndpo.models.provider import build_gpt_model
from megatron_gndpo.models.teacher import build_teacher
from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
from megatron_gndpo.rollout.sampling import vocab_parallel_sample
from megatron_gndpo.trainer.megatron_glue import model_forward, run_schedule

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs" / "demo.yaml"


def _positions(tokens):
    return torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    if cfg.parallel.pipeline_model_parallel_size != 1:
        raise SystemExit("the demo samples without a pipeline; run it with parallel.pipeline_model_parallel_size=1")
    groups = init_parallel(cfg.parallel, seed=cfg.seed)
    student = build_gpt_model(cfg.model, cfg.parallel, cfg.precision, pre_process=True, post_process=True).eval()
    teacher = build_teacher(cfg.teacher, cfg.parallel, pre_process=True, post_process=True)
    vocab = cfg.model.vocab_size

    gen = torch.Generator().manual_seed(cfg.seed + groups.tp_rank)  # per-shard Gumbel noise
    tokens = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        for _ in range(args.new_tokens):
            logits = model_forward(student, {"tokens": tokens, "position_ids": _positions(tokens)})
            nxt = vocab_parallel_sample(logits[:, -1], group=groups.tp, vocab_size=vocab, generator=gen)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)

    batch = {"tokens": tokens[:, :-1], "position_ids": _positions(tokens[:, :-1]), "labels": tokens[:, 1:]}

    def token_logp(logits_shard, mb):
        return {"logp": vocab_parallel_logprobs(logits_shard, mb["labels"], group=groups.tp, vocab_size=vocab)}

    t_logp = run_schedule(teacher, [batch], collect_fn=token_logp, forward_only=True)[0]["logp"]
    s_logp = run_schedule(student, [batch], collect_fn=token_logp, forward_only=True)[0]["logp"]
    mask = torch.zeros_like(t_logp, dtype=torch.bool)
    mask[:, args.prompt_len - 1:] = True  # predictions of the sampled tokens
    adv, stats = gndpo(t_logp, s_logp, mask, group=groups.dp)

    if is_rank0():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"sequence 0: per-token log pi_T - log pi_S (TP={groups.tp_size})")
        for col in ("pos", "token", "log pi_S", "log pi_T", "log-ratio", "GNDPO adv"):
            table.add_column(col, justify="right")
        for t in range(args.prompt_len - 1, tokens.shape[1] - 1):
            table.add_row(str(t + 1), str(tokens[0, t + 1].item()), f"{s_logp[0, t]:.3f}", f"{t_logp[0, t]:.3f}",
                          f"{t_logp[0, t] - s_logp[0, t]:+.3f}", f"{adv[0, t]:+.3f}")
        console = Console()
        console.print(table)
        console.print({k: round(v, 4) for k, v in stats.items()})
    destroy_parallel()


if __name__ == "__main__":
    main()
