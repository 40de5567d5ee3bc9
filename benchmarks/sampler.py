"""Sampler noise: eager vs fused (torch.compile) Gumbel-max, per decode token, one vocabulary shard.

For each batch size B and shard width V_local it times one ``vocab_parallel_sample`` call (temperature
1, no top-k / top-p, TP 1: the counter-based Gumbel noise and the max over the shard) with the eager
reference (``MEGATRON_GNDPO_COMPILE=0``) and with the compiled kernel, plus the eager splitmix64 hash
alone. Peak extra memory is the peak of the bytes allocated on the device during one call: CUDA's
allocator statistics on a GPU, the profiler's allocation events (``profile_memory``) on CPU.
``--verify N`` also compares eager and compiled numbers on N random cases.

    python benchmarks/sampler.py [--device cpu|cuda] [--batch 8 64] [--vocab 32768 151936]
                                 [--repeats 3] [--verify 0] [--out benchmarks/results/sampler_<device>.json]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sampling = importlib.import_module("megatron_gndpo.rollout.sampling")  # from this checkout, installed or not

SEED = 1234


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(fn, device) -> int:
    """Peak of the bytes allocated on ``device`` while ``fn`` runs, above what was live before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _time_ms(fn, device, repeats) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _inputs(b, v, device, gen):
    logits = (torch.randn(b, v, generator=gen) * 2).to(device)
    rows = torch.randint(0, 1 << 20, (b,), generator=gen).to(device)
    position = torch.randint(0, 1 << 15, (b,), generator=gen).to(device)
    return logits, rows, position


def _sample(logits, rows, position, compiled: bool):
    """One decode step's sampling, the fused path forced on (or off) whatever the vocabulary size."""
    os.environ["MEGATRON_GNDPO_COMPILE"] = "1" if compiled else "0"
    return sampling.vocab_parallel_sample(logits, rows=rows, position=position, seed=SEED)


def measure(b, v, device, repeats, gen) -> dict:
    logits, rows, position = _inputs(b, v, device, gen)
    ids = torch.arange(v, device=device)
    key = sampling._seed_key(SEED)
    _sync(device)
    start = time.perf_counter()
    fused_ids = _sample(logits, rows, position, compiled=True)  # compiles at the first shape (B == 1: again)
    _sync(device)
    first_call_s = time.perf_counter() - start
    eager_ids = _sample(logits, rows, position, compiled=False)
    row = {"batch": b, "v_local": v, "first_fused_call_s": first_call_s,
           "same_tokens": bool(torch.equal(fused_ids, eager_ids))}
    for name, fn in (("eager", lambda: _sample(logits, rows, position, compiled=False)),
                     ("fused", lambda: _sample(logits, rows, position, compiled=True)),
                     ("hash_eager", lambda: sampling._hash_uniform(key, rows, position, ids))):
        fn()  # warm: allocator, caches
        row[f"{name}_ms"] = _time_ms(fn, device, repeats)
        row[f"{name}_peak_mib"] = _peak_bytes(fn, device) / 2**20
    return row


def verify(cases, device, gen) -> dict:
    """Eager vs compiled on ``cases`` random (B, V_local, seed, vocab offset) draws, counting differences in
    the float64 term ``log(-log(u))``, in the float32 perturbed logits, and in the shard's (max, argmax).
    ``expected_f32_flips`` sums, over the entries whose float64 term differs, |difference| / float32 ulp:
    the expected number of float32 roundings that the difference would change."""
    log_term = torch.compile(lambda u: torch.log(-torch.log(u)), dynamic=True)
    perturbed = torch.compile(sampling._perturbed, dynamic=True)
    fused = sampling._fused_gumbel_max()
    out = {"cases": cases, "entries": 0, "rows": 0, "f64_term_diff": 0, "f64_term_max_abs_diff": 0.0,
           "expected_f32_flips": 0.0, "f32_perturbed_diff": 0, "max_diff": 0, "argmax_diff": 0, "hash_diff": 0}
    hash_c = torch.compile(sampling._hash_uniform, dynamic=True)
    for _ in range(cases):
        b = int(torch.randint(1, 65, (1,), generator=gen))
        v = int(torch.randint(1000, 8193, (1,), generator=gen))
        start = int(torch.randint(0, 1 << 18, (1,), generator=gen))
        key = sampling._seed_key(int(torch.randint(0, 1 << 62, (1,), generator=gen)))
        logits, rows, position = _inputs(b, v, device, gen)
        ids = torch.arange(start, start + v, device=device)
        u = sampling._hash_uniform(key, rows, position, ids)
        out["hash_diff"] += int((u != hash_c(key, rows, position, ids)).sum())
        t_e, t_c = torch.log(-torch.log(u)), log_term(u)
        d = (t_e - t_c).abs()
        s = logits.double() - t_e
        ulp32 = (torch.nextafter(s.float(), torch.tensor(float("inf"), device=device)) - s.float()).double()
        out["f64_term_diff"] += int((d > 0).sum())
        out["f64_term_max_abs_diff"] = max(out["f64_term_max_abs_diff"], float(d.max()))
        out["expected_f32_flips"] += float((d / ulp32).sum())
        p_e = sampling._perturbed(logits, key, rows, position, ids)
        out["f32_perturbed_diff"] += int((p_e != perturbed(logits, key, rows, position, ids)).sum())
        (b_e, i_e), (b_c, i_c) = sampling._gumbel_max(logits, key, rows, position, ids), fused(
            logits, key, rows, position, ids)
        out["max_diff"] += int((b_e != b_c).sum())
        out["argmax_diff"] += int((i_e != i_c).sum())
        out["entries"] += b * v
        out["rows"] += b
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936], help="V_local, the shard's width")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--verify", type=int, default=0, metavar="N", help="random eager-vs-compiled cases to compare")
    p.add_argument("--out", default=None, help="default: benchmarks/results/sampler_<device>.json")
    args = p.parse_args()
    sampling._FUSE_MIN_VOCAB = 0  # measure the fused path at any --vocab
    device = torch.device(args.device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"sampler_{device.type}.json")
    gen = torch.Generator().manual_seed(0)
    name = (torch.cuda.get_device_name(0) if device.type == "cuda"
            else f"{_cpu_name()} ({torch.get_num_threads()} threads)")
    rows = [measure(b, v, device, args.repeats, gen) for b in args.batch for v in args.vocab]
    checked = verify(args.verify, device, gen) if args.verify else None
    print(f"device: {name}, torch {torch.__version__}, {args.repeats} repeats (median)")
    print(f"{'B':>4} {'V_local':>8} {'eager ms':>9} {'fused ms':>9} {'speedup':>8} {'hash ms':>8} "
          f"{'eager MiB':>10} {'fused MiB':>10} {'1st call s':>10} {'same ids':>8}")
    for r in rows:
        print(f"{r['batch']:>4} {r['v_local']:>8} {r['eager_ms']:>9.2f} {r['fused_ms']:>9.2f} "
              f"{r['eager_ms'] / r['fused_ms']:>7.1f}x {r['hash_eager_ms']:>8.2f} {r['eager_peak_mib']:>10.1f} "
              f"{r['fused_peak_mib']:>10.3f} {r['first_fused_call_s']:>10.1f} {r['same_tokens']!s:>8}")
    if checked:
        print("eager vs compiled on random cases:", json.dumps(checked))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                   "config": vars(args), "rows": rows, "verify": checked}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
