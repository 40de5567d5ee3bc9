"""Student train-step and teacher-scoring throughput per layer implementation: megatron's local
spec vs Transformer Engine BF16 vs Transformer Engine FP8.

One process (TP=PP=1), synthetic token batches, the real step machinery: ``build_student`` (megatron
DDP), megatron's optimizer, ``run_schedule`` with a loss computed by ``vocab_parallel_logprobs`` on the
vocab-sharded logits, one optimizer step per iteration. Teacher scoring is the forward-only schedule
collecting token log-probs. Reports tokens/s, model FLOPs utilisation and peak GPU memory.

FLOPs per token (train) = 6 * N + 12 * L * h * S (PaLM's count: N non-embedding parameters plus the
LM head, the attention score/value matmuls at sequence length S, no causal halving); forward only
is a third of that. MFU = achieved FLOPs / the device's dense peak (H100/H200 SXM: 989 TFLOP/s BF16,
1979 FP8; ``--peak-tflops`` overrides; FP8 variants are measured against the BF16 peak as well, so
"MFU" stays comparable).

    python benchmarks/train_step.py --preset 1.5b --variants local-bf16 te-bf16 te-fp8 [--seq 4096 --mbs 1]
    python benchmarks/train_step.py --preset tiny --variants local   # CPU smoke run

Variants that cannot run here (no CUDA / no Transformer Engine) are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_gndpo.config.schema import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig  # noqa: E402

PRESETS = {
    "tiny": ModelConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256),
    # Qwen2.5-0.5B / -1.5B shapes
    "0.5b": ModelConfig(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, intermediate_size=4864, attention_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=32768, rope_theta=1e6),
    "1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, intermediate_size=8960, attention_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=32768, rope_theta=1e6),
}
VARIANTS = {
    "local": dict(transformer_impl="local"),
    "local-bf16": dict(transformer_impl="local", params_dtype="bfloat16"),
    "te-bf16": dict(transformer_impl="transformer_engine", params_dtype="bfloat16"),
    "te-fp8": dict(transformer_impl="transformer_engine", params_dtype="bfloat16", fp8="hybrid",
                   fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max"),
}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(non-embedding parameters incl. the LM head matmul, all parameters)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h + (q + 2 * kv if cfg.attention_bias else 0)
    head = cfg.vocab_size * h
    body = cfg.num_hidden_layers * per_layer + h
    return body + head, body + head * (1 if cfg.tie_word_embeddings else 2)


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    return 6 * parameter_counts(cfg)[0] + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def skip_reason(precision: PrecisionConfig) -> str | None:
    from megatron_gndpo.models.provider import use_transformer_engine

    try:
        use_transformer_engine(precision)
    except ValueError as e:
        return str(e)
    if precision.params_dtype == "bfloat16" and not torch.cuda.is_available():
        return "bf16 variants are GPU measurements"
    return None


def _batches(cfg: ModelConfig, n: int, mbs: int, seq: int, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].to(device), "targets": tokens[:, 1:].to(device),
                    "position_ids": torch.arange(seq, device=device).expand(mbs, seq).contiguous()})
    return out


def _timed(fn, *, steps: int, warmup: int) -> tuple[float, float | None]:
    """(seconds for ``steps`` calls after ``warmup`` calls, peak GiB allocated during them on CUDA)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)


def measure(cfg: ModelConfig, precision: PrecisionConfig, *, seq: int, mbs: int, microbatches: int, steps: int,
            warmup: int) -> dict:
    """Models are built on the GPU when there is one (megatron initialises on the current device)."""
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.student import build_optimizer, build_student
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.trainer.megatron_glue import run_schedule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parallel = ParallelConfig()
    batches = _batches(cfg, microbatches, mbs, seq, device)
    tokens_per_iter = microbatches * mbs * seq
    result = {}

    model = build_student(cfg, parallel, precision, pre_process=True, post_process=True)
    optimizer = build_optimizer(OptimConfig(lr=1e-5), precision, parallel, model)

    def loss_fn(logits, batch):
        lp = vocab_parallel_logprobs(logits.float(), batch["targets"], group=None)
        return -lp.sum() / tokens_per_iter, {}

    def train_iter():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        run_schedule(model, batches, loss_fn=loss_fn, forward_only=False)
        optimizer.step()

    seconds, result["train_peak_gib"] = _timed(train_iter, steps=steps, warmup=warmup)
    result["train_tokens_per_s"] = steps * tokens_per_iter / seconds
    model = optimizer = None  # free the student before the teacher is built
    if device.type == "cuda":
        torch.cuda.empty_cache()

    teacher = build_gpt_model(cfg, parallel, precision, pre_process=True, post_process=True).eval()

    def score():
        with torch.no_grad():
            run_schedule(teacher, batches, forward_only=True,
                         collect_fn=lambda logits, b: {"lp": vocab_parallel_logprobs(logits.float(), b["targets"])})

    seconds, result["score_peak_gib"] = _timed(score, steps=steps, warmup=warmup)
    result["score_tokens_per_s"] = steps * tokens_per_iter / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["local"])
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 4096 on GPU, 64 on CPU)")
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense BF16 peak of this device")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_step.json"))
    args = parser.parse_args()

    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    cfg = PRESETS[args.preset]
    seq = args.seq or (4096 if torch.cuda.is_available() else 64)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    init_parallel(ParallelConfig(), seed=0)
    rows = {}
    try:
        for name in args.variants:
            precision = PrecisionConfig(**VARIANTS[name])
            reason = skip_reason(precision)
            if reason:
                rows[name] = {"skipped": reason}
                continue
            r = measure(cfg, precision, seq=seq, mbs=args.mbs, microbatches=args.microbatches, steps=args.steps,
                        warmup=args.warmup)
            if peak:
                fpt = flops_per_token(cfg, seq)
                r["train_mfu"] = r["train_tokens_per_s"] * fpt / (peak * 1e12)
                r["score_mfu"] = r["score_tokens_per_s"] * fpt / 3 / (peak * 1e12)
            rows[name] = r
    finally:
        destroy_parallel()

    non_embedding, total = parameter_counts(cfg)
    print(f"{args.preset}: {total / 1e9:.3f}B parameters, seq {seq}, {args.microbatches} x {args.mbs} sequences "
          f"per step, {device}, torch {torch.__version__}")
    print(f"{'variant':<12}{'train tok/s':>13}{'MFU':>7}{'peak GiB':>10}{'score tok/s':>13}{'MFU':>7}{'peak GiB':>10}")

    def fmt(v, width: int, spec: str) -> str:
        return f"{format(v, spec) if v is not None else '-':>{width}}"

    for name, r in rows.items():
        if "skipped" in r:
            print(f"{name:<12}skipped: {r['skipped']}")
            continue
        print(f"{name:<12}{r['train_tokens_per_s']:>13.0f}{fmt(r.get('train_mfu'), 7, '.1%')}"
              f"{fmt(r['train_peak_gib'], 10, '.1f')}{r['score_tokens_per_s']:>13.0f}{fmt(r.get('score_mfu'), 7, '.1%')}"
              f"{fmt(r['score_peak_gib'], 10, '.1f')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "seq": seq, "device": device, "peak_tflops": peak,
                                          "torch": torch.__version__, "parameters": total,
                                          "flops_per_token": flops_per_token(cfg, seq), "rows": rows,
                                          "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    main()
