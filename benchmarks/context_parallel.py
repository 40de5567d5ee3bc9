"""Context parallelism: per-rank activation memory, time and loss of one training forward + backward of a
micro-batch of long sequences at CP = 1, 2 (4, ...).

One gloo world of ``max(--cp)`` spawned processes, re-laid out per CP value with
``init_parallel`` / ``destroy_parallel`` (TP = PP = 1, DP = world / CP). CP 1 therefore runs as DP = world:
every rank computes the whole micro-batch (all ranks are given the same rows, at every CP value), so each
row of the table is what one rank holds and spends for the same micro-batch. The student is the project's
(``build_student``, local spec: SDPA attention, float32) with the same weights at every CP value; the step is
``run_schedule`` with a token-mean cross-entropy on ``LogitsReadout.logprobs``, megatron's DDP reducing the
gradients over DP x CP as in training.

Reported per CP value:
  peak MiB   per rank, bytes of live tensors created during one forward + backward (``TensorBytes``, counted
             at the dispatcher, so CPU works; weights and DDP's gradient buffer exist before and are not
             counted), in a pass of its own after the timed ones (the tracker's hook slows every op)
  s/iter     median wall time of ``--repeats`` forward + backward passes (after ``--warmup``), ranks in step
  loss       the token-mean cross-entropy, which must equal CP 1's (max relative difference printed)

With the SDPA attention every CP rank all-gathers the whole sequence's K and V (docs/context_parallel.md), so
the K / V part of the activations is not divided by CP; Transformer Engine's ring attention (GPU) is not
measured here. CPU times say how the split behaves on this machine, not what a GPU would do.

    python benchmarks/context_parallel.py [--cp 1 2 4] [--rows 2] [--seq 2048] [--hidden 256] [--layers 4]
                                          [--heads 8] [--kv-heads 2] [--vocab 2048] [--repeats 3]
                                          [--out benchmarks/results/context_parallel_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_efficiency import versions  # noqa: E402
from benchmarks.tensor_memory import TensorBytes  # noqa: E402
from megatron_gndpo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig  # noqa: E402

PRECISION = PrecisionConfig(params_dtype="float32", transformer_impl="local")


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       intermediate_size=4 * args.hidden, max_position_embeddings=args.seq)


def token_mean_ce(readout, n_tokens: int):
    """Loss = -sum_t log p(label_t) / n_tokens over the whole micro-batch (``n_tokens`` = rows x seq)."""
    from megatron_gndpo.trainer.megatron_glue import TokenLoss

    return TokenLoss(lambda logits, batch: {"lp": readout.logprobs(logits, batch["labels"])},
                     lambda tokens, batch: (-tokens["lp"].sum() / n_tokens, {"lp_sum": tokens["lp"].detach().sum()}))


def measure(cp: int, args, weights):
    """One CP value on this rank: (peak bytes, median seconds, loss, weights used)."""
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel
    from megatron_gndpo.models.student import build_student, unwrap
    from megatron_gndpo.models.weights import gather_global_weights, load_global_weights
    from megatron_gndpo.trainer.megatron_glue import LogitsReadout, run_schedule

    destroy_parallel(destroy_process_group=False)
    parallel = ParallelConfig(context_parallel_size=cp)
    groups = init_parallel(parallel, seed=args.seed)
    model = build_student(model_config(args), parallel, PRECISION, pre_process=True, post_process=True)
    if weights is None:
        weights = gather_global_weights(unwrap(model))
    else:
        load_global_weights(unwrap(model), weights)
    data = torch.randint(0, args.vocab, (args.rows, args.seq + 1), generator=torch.Generator().manual_seed(args.seed))
    mb = {"tokens": data[:, :-1], "labels": data[:, 1:],
          "position_ids": torch.arange(args.seq).expand(args.rows, -1).contiguous()}
    loss = token_mean_ce(LogitsReadout(groups.tp, 1.0, args.vocab), args.rows * args.seq)

    def step():
        model.zero_grad_buffer()
        metrics = run_schedule(model, [mb], loss=loss, forward_only=False)
        return -metrics[0]["lp_sum"].item() / (args.rows * args.seq)

    times = []
    for i in range(args.warmup + args.repeats):  # the warm-up builds lazy buffers (rotary tables)
        dist.barrier()
        start = time.perf_counter()
        value = step()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    with TensorBytes() as tracker:
        step()
    return tracker.peak, statistics.median(times), value, weights


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(args.threads)
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=args.seed)
    weights, rows = None, []
    try:
        for cp in args.cp:
            peak, seconds, loss, weights = measure(cp, args, weights)
            rows.append({"cp": cp, "dp": world // cp, "peak_bytes": peak, "s_per_iter": seconds, "loss": loss})
    finally:
        destroy_parallel()
    queue.put((rank, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="CP sizes; the world is the largest")
    parser.add_argument("--rows", type=int, default=2, help="rows of the micro-batch (the same on every rank)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row, a multiple of 2 x every CP size")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/context_parallel_cpu.json"))
    args = parser.parse_args()
    world = max(args.cp)
    bad = [cp for cp in args.cp if world % cp or args.seq % (2 * cp)]
    if bad:
        parser.error(f"--cp {bad}: each CP size must divide the world ({world}) and --seq / 2 ({args.seq // 2})")
    args.cp = sorted(set(args.cp))

    from megatron_gndpo.distributed.init import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        sys.exit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")

    ref = per_rank[0][0]["loss"] if args.cp[0] == 1 else None
    rows = []
    for i, cp in enumerate(args.cp):
        ours = [per_rank[r][i] for r in range(world)]
        losses = [o["loss"] for o in ours]
        rows.append({"cp": cp, "ranks": world, "dp": ours[0]["dp"],
                     "peak_mib_per_rank": [o["peak_bytes"] / 2 ** 20 for o in ours],
                     "s_per_iter": max(o["s_per_iter"] for o in ours), "loss": losses[0],
                     "max_rel_diff_vs_cp1": None if ref is None else max(abs(v - ref) / abs(ref) for v in losses)})
    device = "CPU, 2 cores, shared"
    print(f"device: {device}, {versions()}, {world} gloo ranks x {args.threads} thread(s); micro-batch "
          f"{args.rows} x {args.seq} tokens, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} KV), vocab {args.vocab}, float32, SDPA")
    print("CP 1 runs as DP = world: every rank computes the whole micro-batch")
    print("\n| CP | ranks | peak MiB per rank | s/iter | loss | max rel diff vs CP 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        diff = "-" if r["max_rel_diff_vs_cp1"] is None else f"{r['max_rel_diff_vs_cp1']:.1e}"
        print(f"| {r['cp']} | {r['ranks']} | {max(r['peak_mib_per_rank']):.1f} | {r['s_per_iter']:.2f} | "
              f"{r['loss']:.6f} | {diff} |")
    out = {"device": device, "date": time.strftime("%Y-%m-%d"), "versions": versions(),
           "threads_per_rank": args.threads, "cp1": "DP = world, every rank the same rows",
           "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
