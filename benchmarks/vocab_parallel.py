"""Vocab-parallel log-prob: gathered baseline, sharded op, megatron-core's cross-entropy, fused LM head.

For each vocabulary size, token count and TP size, one forward + backward of the sampled-token
log-prob, measured per rank in two separate passes:

- time: ``--repeats`` runs without any instrumentation (median and min, after ``--warmup`` runs);
- memory and communication: one more run under a ``TorchDispatchMode`` that tracks every allocation
  (peak bytes of live tensors created by the call, so it works on CPU and GPU alike) and a wrapper of
  ``torch.distributed`` counting the bytes sent. The tracker's Python hook on every op distorts wall
  time (on a GPU it costs more than the kernels), which is why it never runs in a timed pass.

Variants: ``gathered`` (all-gather the vocabulary, ``log_softmax``), ``vocab_parallel``
(``ops.vocab_parallel.vocab_parallel_logprobs``), ``vocab_parallel_inplace`` (the same with
``inplace=True``), ``megatron`` (megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy``,
which overwrites its input logits with the softmax and then with the gradient, as ``inplace=True``
does) and ``fused`` (``ops.vocab_parallel.fused_linear_logprobs``). All but ``fused`` start from
the ``[N, V/TP]`` logits shard an LM head produced, outside the measurement (a fresh copy per run,
since the in-place variants destroy it); ``fused`` starts from the hidden states and the weight
shard, so its time and memory include the LM-head matmuls.

    python benchmarks/vocab_parallel.py [--vocab 32000 152064] [--tokens 256 1024] [--tp 1 2 4]
                                         [--variants ...] [--dtype float32|bfloat16] [--chunk 1024]
                                         [--hidden 256] [--out benchmarks/results/vocab_parallel.json]

Prints a table and writes JSON. Run on CPU with gloo (spawned processes) or on a GPU with nccl.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.tensor_memory import TensorBytes  # noqa: E402
from megatron_gndpo.ops.vocab_parallel import (  # noqa: E402
    DEFAULT_CHUNK,
    fused_linear_logprobs,
    vocab_parallel_logprobs,
)

VARIANTS = ("gathered", "vocab_parallel", "vocab_parallel_inplace", "megatron", "fused")


class CommCounter:
    """Bytes this rank sends through all_reduce / all_gather (ring-free count: the tensor payload)."""

    def __init__(self):
        self.bytes = 0
        self._orig = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _orig=orig, _name=name, **kwargs):
                t = args[1] if _name == "all_gather" else args[0]
                self.bytes += t.numel() * t.element_size()
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def gathered_baseline(logits_shard, target, group):
    """What we avoid: all-gather the vocabulary, then log_softmax on the full [N, V] logits."""
    parts = [torch.empty_like(logits_shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits_shard, group=group)
    full = torch.cat(parts, dim=-1)
    # the gather is not differentiable: route the gradient back to this rank's shard by hand
    full = full.detach().requires_grad_(True)
    lp = F.log_softmax(full.float(), -1).gather(-1, target[:, None]).squeeze(-1)
    return lp, full


def forward_backward(variant, logits, hidden, weight, target, group, chunk):
    """One forward + backward of the summed sampled-token log-probs; returns the gradients w.r.t. the
    inputs. ``autograd.grad`` hands them over as a model's LM-head backward would receive them (a
    leaf's ``.grad`` would add a copy where megatron's gradient shares the leaf's storage)."""
    if variant == "fused":
        lp = fused_linear_logprobs(hidden, weight, target, group=group, chunk_size=chunk)
        return torch.autograd.grad(lp.sum(), (hidden, weight))
    if variant == "gathered":
        rank, v_local = dist.get_rank(group), logits.shape[-1]
        lp, full = gathered_baseline(logits, target, group)
        return torch.autograd.grad(lp.sum(), full)[0][:, rank * v_local:(rank + 1) * v_local]
    if variant == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        lp = -vocab_parallel_cross_entropy(logits, target)  # its loss is -log p
    else:
        lp = vocab_parallel_logprobs(logits, target, group=group, chunk_size=chunk,
                                     inplace=variant == "vocab_parallel_inplace")
    return torch.autograd.grad(lp.sum(), logits)


def measure(variant, n_tokens, vocab, cfg, group, device):
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    v_local = vocab // tp
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden_states = torch.randn(n_tokens, cfg["hidden"], generator=g).to(device)
    weight = (torch.randn(vocab, cfg["hidden"], generator=g) * 0.02)[rank * v_local:(rank + 1) * v_local].to(device)
    target = torch.randint(0, vocab, (n_tokens,), generator=g).to(device)
    dtype = getattr(torch, cfg["dtype"])
    # megatron's LM head output, on this rank: [N, V/TP]
    logits_made = None if variant == "fused" else (hidden_states @ weight.t()).to(dtype)

    def fresh_inputs():
        leaf = lambda t: t.to(dtype).clone().requires_grad_(True)  # noqa: E731
        if variant == "fused":
            return None, leaf(hidden_states), leaf(weight)
        return logits_made.clone().requires_grad_(True), None, None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier(group=group)

    times = []
    for i in range(cfg["warmup"] + cfg["repeats"]):
        inputs = fresh_inputs()
        sync()
        start = time.perf_counter()
        forward_backward(variant, *inputs, target, group, cfg["chunk"])
        sync()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - start)
        del inputs
    inputs = fresh_inputs()
    sync()
    with TensorBytes() as mem, CommCounter() as comm:
        forward_backward(variant, *inputs, target, group, cfg["chunk"])
    return {"time_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak_mib": mem.peak / 2**20,
            "comm_bytes_per_token": comm.bytes / n_tokens}


def _worker(rank, world, port, cfg, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from megatron_gndpo.config.schema import ParallelConfig
    from megatron_gndpo.distributed.init import destroy_parallel, init_parallel

    # megatron's groups too: its cross-entropy takes the TP group from parallel_state
    groups = init_parallel(ParallelConfig(tensor_model_parallel_size=world, pipeline_model_parallel_size=1))
    rows = []
    for vocab in cfg["vocab"]:
        vocab_p = -(-vocab // (128 * world)) * 128 * world  # megatron's padding
        for n in cfg["tokens"]:
            for variant in cfg["variants"]:
                r = measure(variant, n, vocab_p, cfg, groups.tp, groups.device)
                rows.append({"tp": world, "vocab": vocab, "tokens": n, "variant": variant, **r})
    if rank == 0:
        queue.put(rows)
    destroy_parallel()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the logits (and of hidden / weight for fused)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="chunk_size of the project's ops")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                              "vocab_parallel.json"))
    args = p.parse_args()
    cfg = vars(args)
    rows = []
    ctx = mp.get_context("spawn")
    for tp in args.tp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, tp, port, cfg, queue)) for r in range(tp)]
        for pr in procs:
            pr.start()
        rows += queue.get(timeout=3600)
        for pr in procs:
            pr.join()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    import megatron.core

    versions = {"torch": torch.__version__, "megatron_core": megatron.core.__version__}
    print(f"device: {device}, {versions}, logits {args.dtype}, hidden {args.hidden}, chunk {args.chunk}")
    print(f"{'TP':>3} {'vocab':>7} {'tokens':>6} {'variant':>15} {'peak MiB/rank':>13} {'bytes/token':>11} "
          f"{'median ms':>9} {'min ms':>9}")
    for r in rows:
        print(f"{r['tp']:>3} {r['vocab']:>7} {r['tokens']:>6} {r['variant']:>15} {r['peak_mib']:>13.1f} "
              f"{r['comm_bytes_per_token']:>11.1f} {r['time_ms']:>9.1f} {r['min_ms']:>9.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "date": time.strftime("%Y-%m-%d"), **versions, "config": cfg, "rows": rows}, f,
                  indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
