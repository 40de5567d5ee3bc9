"""`make demo`: a real on-policy distillation on 2 CPU cores, GNDPO next to plain OPD.

    python -m megatron_gndpo.demo [--config examples/configs/demo.yaml] [--out outputs/demo] [--nproc 2]

1. A 4-layer teacher learns 2-digit addition by supervised training (``examples/arithmetic``);
   a 2-layer student gets a short warm-up only. Both are cached under ``--out``.
2. The student is distilled from the teacher with GNDPO, then again from the same start with OPD,
   each ``torchrun --nproc-per-node N -m megatron_gndpo.train`` at TP=2 with the same seeds.
3. Prints ``student accuracy: A -> B (teacher T)`` (greedy, 500 held-out sums) and writes
   ``gndpo_vs_opd.png``: reward, log-ratio std and gradient norm per step for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "examples" / "configs" / "demo.yaml"
SFT = {"teacher": {"steps": 1500, "lr": 2e-3}, "student": {"steps": 450, "lr": 2e-3}}
ESTIMATORS = ("gndpo", "opd")


def _run(cmd, env):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def _read_metrics(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(runs, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward", "reward (exact match)"), ("score/std", "log-ratio std (before whitening)"),
              ("actor/grad_norm", "gradient norm"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, title) in zip(axes, panels):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), label=name.upper())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for the distillation runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    # The warm-ups are one process and may use every core; the distillation ranks get one thread each.
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for role, recipe in SFT.items():
        _run([sys.executable, "examples/arithmetic/train_sft.py", "--config", args.config, "--role", role,
              "--steps", str(recipe["steps"]), "--lr", str(recipe["lr"]), "--out", str(out / role),
              "parallel.tensor_model_parallel_size=1"], env)
    env["OMP_NUM_THREADS"] = "1"
    teacher_acc = json.loads((out / "teacher" / "gndpo_meta.json").read_text())["val_acc"]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    runs = {}
    for est in ESTIMATORS:
        run_dir = out / est
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
        _run(torchrun + ["-m", "megatron_gndpo.train", "--config", args.config, f"algorithm.estimator={est}",
                         f"trainer.output_dir={run_dir}", f"teacher.checkpoint={out / 'teacher'}",
                         f"student_checkpoint={out / 'student'}", *args.overrides], env)
        runs[est] = _read_metrics(run_dir / "metrics.jsonl")

    _plot(runs, out / "gndpo_vs_opd.png")
    for est, rows in runs.items():
        val = [r["val/acc"] for r in rows if "val/acc" in r]
        print(f"{est}: held-out accuracy per validation: " + " ".join(f"{v:.3f}" for v in val))
    val = [r["val/acc"] for r in runs["gndpo"] if "val/acc" in r]
    print(f"plot: {out / 'gndpo_vs_opd.png'}")
    print(f"student accuracy: {val[0]:.3f} -> {val[-1]:.3f} (teacher {teacher_acc:.3f})")


if __name__ == "__main__":
    main()
