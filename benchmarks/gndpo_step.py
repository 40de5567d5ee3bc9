"""One whole GNDPO step at a realistic shape: seconds per phase (rollout, teacher, old log-probs, train).

The real trainer (``Trainer.train_step``) on random-weight models of Qwen2.5 shapes (``train_step.py``'s
presets), with prompts of ``--prompt-len`` digit tokens written to a temporary parquet file and the
arithmetic tokenizer of the demo (its ids index into the first rows of the large vocabulary). Random
weights almost never sample EOS, so every response runs to ``--max-new`` tokens: the step is timed at
its longest. Prints the phase table and writes JSON.

    python benchmarks/gndpo_step.py --student 0.5b --teacher 1.5b --prompts 8 --samples 8 --max-new 1024
    python benchmarks/gndpo_step.py --student tiny --teacher tiny --max-new 16     # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import PRESETS, versions  # noqa: E402

PHASES = ("rollout", "teacher", "old_logprobs", "train", "step")


def run_config(args, tmp: Path):
    from megatron_gndpo.config.loader import config_from_dict
    from megatron_gndpo.data.prompts import verl_row, write_prompt_parquet

    digits = "1234567890"
    rows = [verl_row([{"role": "user", "content": (digits * args.prompt_len)[i:i + args.prompt_len] + "+1="}], "0",
                     data_source="bench") for i in range(args.prompts * 2)]
    write_prompt_parquet(str(tmp / "prompts.parquet"), rows)
    length = args.prompt_len + args.max_new + 8
    student = dataclasses.asdict(dataclasses.replace(PRESETS[args.student], max_position_embeddings=length))
    teacher = dataclasses.asdict(dataclasses.replace(PRESETS[args.teacher], max_position_embeddings=length))
    student["vocab_size"] = teacher["vocab_size"] = max(student["vocab_size"], teacher["vocab_size"])
    precision = {"transformer_impl": args.impl}
    if args.fp8:
        precision.update(fp8="hybrid", fp8_recipe=args.fp8)
    return config_from_dict({
        "model": student,
        "teacher": {"model": teacher, "offload": args.teacher_offload},
        "precision": precision,
        "optim": {"lr": 1e-6},
        "rollout": {"n_samples": args.samples, "temperature": 1.0, "max_new_tokens": args.max_new},
        "algorithm": {"estimator": "gndpo", "policy_loss": "gspo"},
        "data": {"train_files": [str(tmp / "prompts.parquet")],
                 "tokenizer": str(ROOT / "examples/arithmetic/tokenizer"),
                 "max_prompt_length": args.prompt_len + 8, "reward": "exact_match"},
        "trainer": {"steps": args.steps, "prompts_per_step": args.prompts, "micro_batch_size": args.micro_batch,
                    "mini_batches": 1, "output_dir": str(tmp / "run"), "tensorboard": False, "progress": False},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--teacher", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--impl", choices=("local", "transformer_engine", "auto"), default="auto")
    parser.add_argument("--fp8", choices=("delayed", "tensorwise"), default=None, help="student and teacher in FP8")
    parser.add_argument("--teacher-offload", action="store_true")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="the first step includes warm-up; the last is reported")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gndpo_step.json"))
    args = parser.parse_args()

    from megatron_gndpo.trainer.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run_config(args, Path(tmp)))
        try:
            steps = []
            for _ in range(args.steps):
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                metrics = trainer.train_step()
                metrics["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
                steps.append(metrics)
        finally:
            trainer.close()
    last = steps[-1]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = args.prompts * args.samples
    print(f"{device}: student {args.student}, teacher {args.teacher}, impl {args.impl}, fp8 {args.fp8}, "
          f"{rows} responses of <= {args.max_new} tokens after {args.prompt_len}-token prompts")
    for phase in PHASES:
        print(f"{phase:>14} {last[f'time/{phase}_s']:8.2f} s")
    print(f"{'tokens/s':>14} {last['perf/tokens_per_s']:8.0f}   response length {last['response/length_mean']:.0f}, "
          f"peak {last['peak_gib'] or 0:.1f} GiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "versions": versions(), "date": time.strftime("%Y-%m-%d"),
                                          "args": vars(args), "steps": steps}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    main()
