"""Student train-step and teacher-scoring throughput per layer implementation and precision.

One process (TP=PP=1), synthetic token batches, the real step machinery: ``build_student`` (megatron
DDP), megatron's optimizer, ``run_schedule`` with a loss computed by ``vocab_parallel_logprobs`` on the
vocab-sharded logits (bf16 logits are read chunk by chunk in float32, never copied whole), one
optimizer step per iteration. Teacher scoring is the forward-only schedule collecting token log-probs;
for the FP8 teachers the mean / max |log-prob error| against the BF16 teacher with the same weights is
reported as well.

Train variants (``--train``):
  local-megatron   megatron's local spec, its unfused attention (baddbmm + fp32 softmax), bf16
  local-sdpa       the local spec with torch's scaled_dot_product_attention (flash kernels), bf16
  te-bf16          Transformer Engine spec, bf16
  te-fp8-delayed   TE, FP8 hybrid (E4M3 fwd / E5M2 bwd), delayed scaling (amax history 1024, warm-up steps)
  te-fp8-tensorwise TE, FP8 hybrid, current (per-tensor) scaling
  local            fp32 local spec (CPU smoke runs)
Score variants (``--score``): bf16 (local-sdpa), te-bf16, te-fp8 (delayed), modelopt-fp8 (ModelOpt E4M3
post-training quantisation of the local-sdpa teacher, weights compressed).

FLOPs per token: 6 N (train) or 2 N (forward), N the matmul parameters (decoder linears + LM head, no
embedding lookup), plus the attention score and value matmuls, 4 S d per token and layer forward at
sequence length S and attention width d, halved because the mask is causal (the half above the
diagonal is never computed by flash kernels), times 3 for training. MFU = achieved FLOP/s over the
device's dense BF16 peak (H100 / H200 SXM: 989.4 TFLOP/s; ``--peak-tflops`` overrides); FP8 variants are
measured against the same BF16 peak, so their "MFU" stays comparable across rows.

    python benchmarks/train_step.py --presets 0.5b 1.5b --seqs 1024 4096 --train local-sdpa te-bf16
    python benchmarks/train_step.py --presets tiny --train local --score    # CPU smoke run

Variants that cannot run here are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
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
                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096),
    # Qwen2.5-0.5B / -1.5B / -7B shapes
    "0.5b": ModelConfig(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, intermediate_size=4864, attention_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=32768, rope_theta=1e6),
    "1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, intermediate_size=8960, attention_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=32768, rope_theta=1e6),
    "7b": ModelConfig(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, intermediate_size=18944, attention_bias=True, tie_word_embeddings=False,
                      max_position_embeddings=32768, rope_theta=1e6),
}
BF16 = {"params_dtype": "bfloat16"}
FP8 = {"transformer_impl": "transformer_engine", "fp8": "hybrid", **BF16}
TRAIN = {
    "local": {"transformer_impl": "local", "params_dtype": "float32"},
    "local-megatron": {"transformer_impl": "local", "local_attention": "megatron", **BF16},
    "local-sdpa": {"transformer_impl": "local", "local_attention": "sdpa", **BF16},
    "te-bf16": {"transformer_impl": "transformer_engine", **BF16},
    "te-fp8-delayed": {**FP8, "fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"},
    "te-fp8-tensorwise": {**FP8, "fp8_recipe": "tensorwise"},
}
SCORE = {
    "bf16": TRAIN["local-sdpa"],
    "te-bf16": TRAIN["te-bf16"],
    "te-fp8": TRAIN["te-fp8-delayed"],
    "modelopt-fp8": TRAIN["local-sdpa"],
}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul parameters: decoder linears + LM head, all parameters)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h + (q + 2 * kv if cfg.attention_bias else 0)
    head = cfg.vocab_size * h
    body = cfg.num_hidden_layers * per_layer + h
    return body + head, body + head * (1 if cfg.tie_word_embeddings else 2)


def flops_per_token(cfg: ModelConfig, seq: int, *, train: bool) -> float:
    """Model FLOPs per token (see the module docstring): causal attention counted as half."""
    attention = 4 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim / 2
    forward = 2 * parameter_counts(cfg)[0] + attention
    return 3 * forward if train else forward


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
    """(median seconds per call over ``steps`` calls after ``warmup`` calls, peak GiB allocated during
    them on CUDA). CUDA events around each call: host timers would measure the launch queue."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2], None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) / 1e3 for s, e in events)
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2 ** 30


PROFILE_TO: str | None = None


def _profile(fn, out: str) -> None:
    """Kernel and operator time of two calls (torch.profiler), the top 30 by device time to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    Path(out).write_text(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    print(Path(out).read_text(), flush=True)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_train(cfg: ModelConfig, precision: PrecisionConfig, *, seq: int, mbs: int, microbatches: int,
                  steps: int, warmup: int) -> dict:
    from megatron_gndpo.models.student import build_optimizer, build_student
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.trainer.megatron_glue import TokenLoss, run_schedule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = _batches(cfg, microbatches, mbs, seq, device)
    tokens_per_iter = microbatches * mbs * seq
    model = build_student(cfg, ParallelConfig(), precision, pre_process=True, post_process=True)
    optimizer = build_optimizer(OptimConfig(lr=1e-5), precision, ParallelConfig(), model)

    loss = TokenLoss(lambda logits, batch: {"lp": vocab_parallel_logprobs(logits, batch["targets"])},
                     lambda tokens, batch: (-tokens["lp"].sum() / tokens_per_iter, {}))

    def train_iter():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        run_schedule(model, batches, loss=loss, forward_only=False)
        optimizer.step()

    seconds, peak = _timed(train_iter, steps=steps, warmup=warmup)
    if PROFILE_TO:
        _profile(train_iter, PROFILE_TO)
    return {"tokens_per_s": tokens_per_iter / seconds, "step_s": seconds, "peak_gib": peak}


def _score_fn(model, batches):
    from megatron_gndpo.ops.vocab_parallel import vocab_parallel_logprobs
    from megatron_gndpo.trainer.megatron_glue import run_schedule

    @torch.no_grad()
    def score():
        out = run_schedule(model, batches, forward_only=True,
                           collect_fn=lambda logits, b: {"lp": vocab_parallel_logprobs(logits, b["targets"])})
        return torch.cat([o["lp"] for o in out])

    return score


@contextlib.contextmanager
def _fp8_disabled(model):
    """The same TE model without FP8 (megatron enters FP8 from config.fp8 at each forward)."""
    config = model.config
    saved, config.fp8 = config.fp8, None
    try:
        yield
    finally:
        config.fp8 = saved


def measure_score(cfg: ModelConfig, variant: str, *, seq: int, mbs: int, microbatches: int, steps: int,
                  warmup: int) -> dict:
    from megatron_gndpo.models.provider import build_gpt_model
    from megatron_gndpo.models.teacher import freeze

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = PrecisionConfig(**SCORE[variant])
    batches = _batches(cfg, microbatches, mbs, seq, device)
    model = freeze(build_gpt_model(cfg, ParallelConfig(), precision, pre_process=True, post_process=True))
    score = _score_fn(model, batches)
    result = {}
    if variant == "te-fp8":
        with _fp8_disabled(model):
            reference = score()
        for _ in range(warmup):  # delayed scaling needs an amax history before its scales mean anything
            score()
        result.update(_error(reference, score()))
    elif variant == "modelopt-fp8":
        from megatron_gndpo.models.quantization import quantize_teacher

        reference = score()
        model = quantize_teacher(model, "fp8", lambda m: _score_fn(m, batches[:2])())
        score = _score_fn(model, batches)
        result.update(_error(reference, score()))
    seconds, peak = _timed(score, steps=steps, warmup=warmup)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    return {**result, "tokens_per_s": microbatches * mbs * seq / seconds, "step_s": seconds, "peak_gib": peak,
            "weights_gib": weights_gib}


def _error(reference: torch.Tensor, quantized: torch.Tensor) -> dict:
    diff = (quantized.double() - reference.double()).abs()
    return {"logprob_err_mean": diff.mean().item(), "logprob_err_max": diff.max().item()}


def versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("megatron-core", "transformer-engine", "nvidia-modelopt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["tiny"])
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="default: 1024 4096 on GPU, 64 on CPU")
    parser.add_argument("--train", nargs="*", choices=sorted(TRAIN), default=["local"])
    parser.add_argument("--score", nargs="*", choices=sorted(SCORE), default=[])
    parser.add_argument("--tokens-per-iter", type=int, default=16384,
                        help="tokens per optimizer step / scoring call (micro-batches of one sequence)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense BF16 peak of this device")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of the train variants here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_step.json"))
    args = parser.parse_args()
    global PROFILE_TO
    PROFILE_TO = args.profile

    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    cuda = torch.cuda.is_available()
    seqs = args.seqs or ([1024, 4096] if cuda else [64])
    device = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    init_parallel(ParallelConfig(), seed=0)
    rows = []
    try:
        for preset in args.presets:
            longest = max(seqs + [PRESETS[preset].max_position_embeddings])
            cfg = dataclasses.replace(PRESETS[preset], max_position_embeddings=longest)
            for seq in seqs:
                shape = {"preset": preset, "seq": seq, "microbatches": max(args.tokens_per_iter // seq, 1), "mbs": 1}
                for phase, names in (("train", args.train), ("score", args.score)):
                    for name in names:
                        row = {**shape, "phase": phase, "variant": name}
                        rows.append(row)
                        precision = PrecisionConfig(**(TRAIN if phase == "train" else SCORE)[name])
                        reason = skip_reason(precision)
                        if reason:
                            row["skipped"] = reason
                            continue
                        kwargs = {"seq": seq, "mbs": 1, "microbatches": shape["microbatches"], "steps": args.steps,
                                  "warmup": args.warmup}
                        try:
                            r = (measure_train(cfg, precision, **kwargs) if phase == "train"
                                 else measure_score(cfg, name, **kwargs))
                        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                            row["error"] = f"{type(e).__name__}: {e}"[:500]
                            continue
                        finally:
                            _free()  # the variant's models are garbage now
                        row.update(r)
                        row["flops_per_token"] = flops_per_token(cfg, seq, train=phase == "train")
                        if peak:
                            row["mfu"] = r["tokens_per_s"] * row["flops_per_token"] / (peak * 1e12)
                        print(json.dumps(row), flush=True)
    finally:
        destroy_parallel()

    print(f"{device}, peak {peak} TFLOP/s BF16, {versions()}")
    print(f"{'preset':<6}{'seq':>6}{'phase':>7} {'variant':<18}{'tok/s':>10}{'MFU':>7}{'peak GiB':>9}{'lp err':>9}")
    for r in rows:
        head = f"{r['preset']:<6}{r['seq']:>6}{r['phase']:>7} {r['variant']:<18}"
        if "skipped" in r or "error" in r:
            print(head + ("skipped: " + r["skipped"] if "skipped" in r else "error: " + r["error"])[:150])
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        err = f"{r['logprob_err_mean']:.4f}" if "logprob_err_mean" in r else "-"
        print(head + f"{r['tokens_per_s']:>10.0f}{mfu:>7}{mem:>9}{err:>9}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "peak_tflops_bf16": peak, "versions": versions(),
                                          "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    main()
