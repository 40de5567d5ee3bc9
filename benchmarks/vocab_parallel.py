"""Vocab-parallel log-prob: gathered baseline vs sharded op vs fused chunked LM-head path.

For each vocabulary size, token count and TP size, one forward + backward of the sampled-token
log-prob, measuring per rank: peak bytes of live tensors allocated by the op (tracked with a
TorchDispatchMode on every allocation, so it works on CPU and GPU alike), bytes sent through
collectives per token (counted by wrapping ``torch.distributed``), and wall time.

    python benchmarks/vocab_parallel.py [--vocab 32000 152064] [--tokens 256 1024] [--tp 1 2 4]
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
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_gndpo.ops.vocab_parallel import fused_linear_logprobs, vocab_parallel_logprobs  # noqa: E402


class PeakTensorBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors created inside the mode (freed when their storage dies)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _track(self, t):
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, st.nbytes())

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self._track(t)
        return out


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


def measure(variant, n_tokens, vocab, hidden, group, device, repeats):
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    v_local = vocab // tp
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden_states = torch.randn(n_tokens, hidden, generator=g).to(device)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02)[rank * v_local:(rank + 1) * v_local].to(device)
    target = torch.randint(0, vocab, (n_tokens,), generator=g).to(device)
    times, peak, sent = [], 0, 0
    for _ in range(repeats):
        h = hidden_states.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with PeakTensorBytes() as mem, CommCounter() as comm:
            if variant == "fused":
                lp = fused_linear_logprobs(h, w, target, group=group, chunk_size=256)
                lp.sum().backward()
            else:
                logits = h @ w.t()  # [N, V_local], as megatron's output layer produces
                if variant == "gathered":
                    lp, full = gathered_baseline(logits, target, group)
                    lp.sum().backward()
                    logits.backward(full.grad[:, rank * v_local:(rank + 1) * v_local])
                else:
                    lp = vocab_parallel_logprobs(logits, target, group=group, chunk_size=256)
                    lp.sum().backward()
            del lp
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak, sent = max(peak, mem.peak), comm.bytes
    return {"time_ms": 1e3 * statistics.median(times), "peak_mib": peak / 2**20,
            "comm_bytes_per_token": sent / n_tokens}


def _worker(rank, world, port, cfg, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(rank)
    group = dist.new_group(list(range(world)))
    rows = []
    for vocab in cfg["vocab"]:
        vocab_p = -(-vocab // (128 * world)) * 128 * world  # megatron's padding
        for n in cfg["tokens"]:
            for variant in ("gathered", "vocab_parallel", "fused"):
                r = measure(variant, n, vocab_p, cfg["hidden"], group, device, cfg["repeats"])
                rows.append({"tp": world, "vocab": vocab, "tokens": n, "variant": variant, **r})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=256)
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
    header = f"{'TP':>3} {'vocab':>7} {'tokens':>6} {'variant':>15} {'peak MiB/rank':>13} {'bytes/token':>11} {'ms':>9}"
    print(f"device: {device}, torch {torch.__version__}, hidden {args.hidden}")
    print(header)
    for r in rows:
        print(f"{r['tp']:>3} {r['vocab']:>7} {r['tokens']:>6} {r['variant']:>15} {r['peak_mib']:>13.1f} "
              f"{r['comm_bytes_per_token']:>11.1f} {r['time_ms']:>9.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "config": cfg, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
