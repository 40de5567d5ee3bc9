"""Peak memory of checkpoint conversion: HF -> megatron, megatron -> HF, reshard.

Writes a Llama-shaped HF checkpoint of random bf16 tensors (no transformers model is built), runs
each direction of ``python -m tools.checkpoint_convert`` as its own process, and samples that
process tree's resident memory every 20 ms: anonymous memory (what the converter allocates) and
file-backed pages (memory-mapped safetensors and the scratch file, which the kernel may drop under
pressure). The claim to check: peak anonymous memory is about one decoder layer plus one shard,
not a multiple of the model.

    python benchmarks/convert_memory.py [--hidden 2048 --layers 16 --ffn 5632 --vocab 32000]
                                        [--shard-gb 0.5] [--work DIR] [--out benchmarks/results/convert_memory.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_gndpo.checkpoint.hf_mapping import hf_tensor_shapes  # noqa: E402
from megatron_gndpo.config.schema import ModelConfig  # noqa: E402

GB = 1024 ** 3


def _memory(proc: psutil.Process) -> tuple[int, int]:
    """(anonymous, file-backed) proportional set size of ``proc`` and its children: PSS, so pages a
    forked checkpoint writer shares with its parent are counted once."""
    anon = filed = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                fields = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)
                          if k in ("Pss_Anon", "Pss_File", "Pss_Shmem")}
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        anon += fields.get("Pss_Anon", 0)
        filed += fields.get("Pss_File", 0) + fields.get("Pss_Shmem", 0)
    return anon, filed


def run_measured(argv: list[str], cwd: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak_anon = peak_file = 0
    while proc.poll() is None:
        anon, filed = _memory(ps)
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, filed)
        time.sleep(0.02)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_anon_bytes": peak_anon, "peak_file_bytes": peak_file}


def write_hf(cfg: ModelConfig, out: Path, shard_bytes: int) -> tuple[int, int]:
    """A random bf16 Llama checkpoint; returns (model bytes, largest decoder layer's bytes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from megatron_gndpo.checkpoint.hf_io import plan_shards

    out.mkdir(parents=True)
    LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, tie_word_embeddings=False,
                torch_dtype="bfloat16").save_pretrained(out)
    shapes = hf_tensor_shapes(cfg)
    sizes = [(k, 2 * torch.Size(shape).numel()) for k, shape in shapes.items()]
    shards = plan_shards(sizes, shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: (torch.randn(shapes[k]) * 0.02).to(torch.bfloat16) for k in names}, str(out / name))
        weight_map.update({k: name for k in names})
    total = sum(n for _, n in sizes)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    layer = sum(n for k, n in sizes if k.startswith("model.layers.0."))
    return total, layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--shard-gb", type=float, default=0.5)
    parser.add_argument("--converter-root", default=str(ROOT),
                        help="checkout whose tools.checkpoint_convert is measured (e.g. a worktree of an older commit)")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/convert_memory.json"))
    args = parser.parse_args()

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      head_dim=args.hidden // args.heads, intermediate_size=args.ffn, tie_word_embeddings=False)
    work = Path(args.work or tempfile.mkdtemp(prefix="convert_memory_"))
    shard_bytes = int(args.shard_gb * GB)
    try:
        model_bytes, layer_bytes = write_hf(cfg, work / "hf", shard_bytes)
        tool = [sys.executable, "-m", "tools.checkpoint_convert"]
        tiny = dataclasses.replace(cfg, num_hidden_layers=1, hidden_size=64, intermediate_size=128, vocab_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        write_hf(tiny, work / "tiny", shard_bytes)
        runs = {
            "baseline (tiny model)": tool + ["hf-to-megatron", "--hf", str(work / "tiny"), "--out", str(work / "t")],
            "hf-to-megatron (tp2 pp2)": tool + ["hf-to-megatron", "--hf", str(work / "hf"), "--out", str(work / "mg"),
                                                "--tp", "2", "--pp", "2"],
            "reshard -> tp1 pp1": tool + ["reshard", "--in", str(work / "mg"), "--out", str(work / "mg1")],
            "megatron-to-hf": tool + ["megatron-to-hf", "--megatron", str(work / "mg1"), "--out", str(work / "back"),
                                      "--max-shard-gb", str(args.shard_gb)],
        }
        results = {name: run_measured(argv, Path(args.converter_root)) for name, argv in runs.items()}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"model {model_bytes / GB:.2f} GiB (bf16), one decoder layer {layer_bytes / GB:.3f} GiB, "
          f"shard limit {args.shard_gb} GiB, torch {torch.__version__}")
    base = results["baseline (tiny model)"]["peak_anon_bytes"]
    print(f"{'direction':<26}{'seconds':>9}{'peak anon GiB':>15}{'- baseline':>12}{'x model':>9}"
          f"{'file-backed GiB':>17}")
    for name, r in results.items():
        r["above_baseline_bytes"] = r["peak_anon_bytes"] - base
        print(f"{name:<26}{r['seconds']:>9.1f}{r['peak_anon_bytes'] / GB:>15.2f}{r['above_baseline_bytes'] / GB:>12.2f}"
              f"{r['above_baseline_bytes'] / model_bytes:>9.2f}{r['peak_file_bytes'] / GB:>17.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model_bytes": model_bytes, "layer_bytes": layer_bytes,
                                          "shard_bytes": shard_bytes, "config": vars(args), "torch": torch.__version__,
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
