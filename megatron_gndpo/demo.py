"""`make demo`: a real on-policy distillation on 2 CPU cores, GNDPO next to plain OPD.

    python -m megatron_gndpo.demo [--config examples/configs/demo.yaml] [--out outputs/demo] [--nproc 2]

1. A teacher (hidden 128) learns 2-digit addition by supervised training (``examples/arithmetic``);
   a student (hidden 64) gets a short warm-up at a constant learning rate only. Both are cached under ``--out``.
2. The student is distilled from the teacher with GNDPO (plus a forward-KL term, ``demo.yaml``), then
   again from the same start with OPD, each ``torchrun --nproc-per-node N -m megatron_gndpo.train`` at
   TP=2 with the same seeds.
3. Prints OPD's ``opd student accuracy: A -> B (teacher T)``, then GNDPO's as the last line,
   ``student accuracy: A -> B`` (greedy, 500 held-out sums), and writes ``gndpo_vs_opd.png``:
   reward, log-ratio std, gradient norm and held-out accuracy per step for both.

Every number is the same on every run on a machine: the data order and sampling are seeded and the
thread counts are pinned (CPU matmuls are deterministic for a fixed thread count). The demo only ever
deletes the run directories it made itself (``--out/<estimator>`` holding its marker file).
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
# The student's warm-up stops mid-course, at a constant rate: a student annealed to a standstill (cosine
# to zero) first gets worse when training resumes with a fresh optimizer, one in mid-course does not.
SFT = {"teacher": {"steps": 1000, "lr": 3e-3, "decay": "cosine"},
       "student": {"steps": 600, "lr": 2e-3, "decay": "constant"}}
ESTIMATORS = ("gndpo", "opd")
# Threads of the one-process warm-ups: fixed rather than "all cores" so that the weights, and so every
# number after them, do not depend on how many cores the machine has; one, because two threads on two
# busy cores wait on each other (several times slower).
SFT_THREADS = 1
# Written into each distillation run directory the demo creates; only directories holding it are ever
# deleted (by the next demo run, to start afresh).
MARKER = ".megatron-gndpo-demo"


class DemoError(RuntimeError):
    pass


def run_command(cmd, env):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def read_metrics(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_out(out: Path) -> None:
    """Before any compute: refuse an ``--out`` whose run directories the demo did not make (a
    non-empty ``<estimator>/`` without the marker) or whose warm-up directories hold foreign files."""
    from megatron_gndpo.checkpoint.integrity import foreign_files

    for est in ESTIMATORS:
        check_owned_dir(out / est, MARKER)
    for role in SFT:
        foreign = foreign_files(out / role)
        if foreign:
            raise DemoError(f"{out / role} holds files the demo did not write ({', '.join(foreign[:5])}); "
                            "refusing to replace it. Move them away or choose another --out.")


def check_owned_dir(path: Path, marker: str) -> None:
    """Refuse ``path`` unless it is absent, empty, or a directory holding ``marker`` (one the demo made)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise DemoError(f"{path} is not a directory the demo made; refusing to replace it. Choose another --out.")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise DemoError(f"{path} is not empty and was not made by the demo (no {marker} in it); "
                        "refusing to delete it. Move it away or choose another --out.")


def fresh_run_dir(run_dir: Path) -> None:
    """Empty ``run_dir`` for a fresh run; :func:`check_out` has made sure the demo owns it."""
    if (run_dir / MARKER).is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("made by `python -m megatron_gndpo.demo`, which replaces this directory on its "
                                  "next run; delete this file to keep the directory from it\n")


def plot_runs(runs, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward", "reward (exact match, sampled)"), ("score/std", "log-ratio std (before whitening)"),
              ("actor/grad_norm", "gradient norm (before clipping)"), ("val/acc", "held-out accuracy (greedy)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(20, 4))
    for ax, (key, title) in zip(axes, panels):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), label=name.upper(), marker="o" if key == "val/acc" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def demo_arguments(argv, description: str, config: Path, out: Path, check_out, name: str) -> argparse.Namespace:
    """The command line both demos take (``out`` resolved to an absolute path), with ``check_out(out)``
    run before any compute: a refusal exits with its reason, prefixed with the demo's ``name``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(config))
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for the distillation runs")
    args = parser.parse_args(argv)
    args.out = Path(args.out).resolve()
    try:
        check_out(args.out)
    except DemoError as e:
        sys.exit(f"{name}: {e}")
    return args


def checkout_env() -> dict:
    """The demos' subprocess environment: this checkout's package first (the warm-up scripts are run by
    path, and would otherwise import whichever megatron_gndpo the interpreter has installed)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}


def main(argv=None):
    args = demo_arguments(argv, __doc__, DEFAULT_CONFIG, REPO / "outputs" / "demo", check_out, "demo")
    out = args.out
    env = checkout_env()
    for role, recipe in SFT.items():
        run_command([sys.executable, "examples/arithmetic/train_sft.py", "--config", args.config, "--role", role,
              "--steps", str(recipe["steps"]), "--lr", str(recipe["lr"]), "--decay", recipe["decay"],
              "--threads", str(SFT_THREADS),
              "--out", str(out / role), "parallel.tensor_model_parallel_size=1"], env)
    # one thread per distillation rank: the ranks share the cores, and the count stays fixed
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    teacher_acc = json.loads((out / "teacher" / "gndpo_meta.json").read_text())["val_acc"]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    runs = {}
    for est in ESTIMATORS:
        run_dir = out / est
        fresh_run_dir(run_dir)
        run_command(torchrun + ["-m", "megatron_gndpo.train", "--config", args.config, f"algorithm.estimator={est}",
                         f"trainer.output_dir={run_dir}", f"teacher.checkpoint={out / 'teacher'}",
                         f"student_checkpoint={out / 'student'}", *args.overrides], env)
        runs[est] = read_metrics(run_dir / "metrics.jsonl")

    plot_runs(runs, out / "gndpo_vs_opd.png")
    acc = {}
    for est, rows in runs.items():
        acc[est] = [r["val/acc"] for r in rows if "val/acc" in r]
        print(f"{est}: held-out accuracy per validation: " + " ".join(f"{v:.3f}" for v in acc[est]))
    print(f"plot: {out / 'gndpo_vs_opd.png'}")
    print(f"opd student accuracy: {acc['opd'][0]:.3f} -> {acc['opd'][-1]:.3f} (teacher {teacher_acc:.3f})")
    print(f"student accuracy: {acc['gndpo'][0]:.3f} -> {acc['gndpo'][-1]:.3f} (teacher {teacher_acc:.3f})")


if __name__ == "__main__":
    main()
