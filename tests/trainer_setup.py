"""A tiny but complete trainer run for the tests: the arithmetic tokenizer, a 48-prompt parquet file,
a 2-layer student and a 2-layer teacher, both loaded from checkpoints written once per test session so
every layout starts from the same weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_gndpo.config.loader import apply_overrides, config_from_dict
from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "examples" / "arithmetic" / "tokenizer")

ARCH = dict(vocab_size=15, make_vocab_size_divisible_by=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)


def write_prompts(path: Path, n: int = 48) -> str:
    rows = [verl_row([{"role": "user", "content": f"{a}+{a % 7}="}], str(a + a % 7), data_source="test")
            for a in range(n)]
    write_prompt_parquet(str(path), rows)
    return str(path)


def tree(tmp: Path, **sections) -> dict:
    base = {
        "seed": 7,
        "model": dict(ARCH),
        "teacher": {"model": dict(ARCH, hidden_size=48)},
        "precision": {"params_dtype": "float32", "transformer_impl": "local"},
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "clip_grad": 1.0},
        "rollout": {"n_samples": 4, "temperature": 1.0, "max_new_tokens": 4},
        "algorithm": {"estimator": "gndpo", "policy_loss": "gspo"},
        "data": {"train_files": [str(tmp / "train.parquet")], "val_files": [str(tmp / "train.parquet")],
                 "tokenizer": TOKENIZER, "max_prompt_length": 8},
        "trainer": {"steps": 2, "prompts_per_step": 4, "micro_batch_size": 4, "mini_batches": 2,
                    "output_dir": str(tmp / "run"), "tensorboard": False, "progress": False, "val_prompts": 8},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def run_config(tmp: Path, overrides=(), **sections):
    return config_from_dict(apply_overrides(tree(tmp, **sections), list(overrides)))


def make_initial_checkpoints(groups, tmp: str):
    """Harness function (any number of ranks, TP1 x PP1): random student / teacher weights saved as
    dist-checkpoints, the same from every rank."""
    import torch.distributed as dist

    from megatron_gndpo.checkpoint.dist_ckpt import save_model_weights
    from megatron_gndpo.models.provider import build_gpt_model

    tmp = Path(tmp)
    if dist.get_rank() == 0:
        write_prompts(tmp / "train.parquet")
    dist.barrier()
    cfg = run_config(tmp)
    for arch, name in ((cfg.model, "student"), (cfg.teacher.model, "teacher")):
        model = build_gpt_model(arch, cfg.parallel, cfg.precision, pre_process=True, post_process=True)
        save_model_weights(model, tmp / name, arch, {"tp": 1, "pp": 1}, tokenizer=cfg.data.tokenizer)
    return dataclasses.asdict(cfg)["model"]
