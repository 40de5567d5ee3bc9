"""`make demo-vlm`: on-policy distillation of a vision-language student on 2 CPU cores, with images.

    python -m megatron_gndpo.demo_vlm [--config examples/configs/demo_vlm.yaml] [--out outputs/demo_vlm]
                                      [--nproc 2]

1. A tiny InternVL teacher (InternViT of hidden 64 + Qwen2 language model of hidden 128) learns to count
   the shapes in 28 x 28 pictures (``examples/counting``) by supervised training of every part,
   vision tower included; a smaller student (hidden 32 + 64) gets a short warm-up at a constant rate.
   Both are Hugging Face InternVL directories, cached under ``--out`` (``hf_teacher/``, ``hf_student/``).
2. Each is converted with ``megatron-gndpo convert hf-to-megatron`` at TP=2 (``teacher/``, ``student/``).
3. The student is distilled from the teacher with GNDPO plus a forward-KL term (``demo_vlm.yaml``, the
   recipe of ``make demo``) by ``torchrun --nproc-per-node N -m megatron_gndpo.train`` with
   ``data.images: process``: the sampler, the teacher and the update all see the pictures.
4. Prints ``student accuracy: A -> B (teacher T)`` as the last line (greedy, the 300 held-out pictures)
   and writes ``gndpo.png``.

Nothing the demo did not make is deleted: ``--out/gndpo`` and the warm-up directories are replaced only
when they carry the demo's marker / recipe file, the converted checkpoints only when megatron-gndpo wrote
every file in them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_gndpo.demo import (MARKER, DemoError, check_owned_dir, checkout_env, demo_arguments, fresh_run_dir,
                                 plot_runs, read_metrics, run_command)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "examples" / "configs" / "demo_vlm.yaml"
SFT_SCRIPT = "examples/counting/train_sft.py"
RECIPE_FILE = "demo_recipe.json"  # what the warm-up script writes beside the model it made
SFT = {"teacher": {"steps": 800, "lr": 5e-4, "decay": "cosine"},
       "student": {"steps": 300, "lr": 5e-4, "decay": "constant"}}
SFT_THREADS = 1
TP = 2  # the layout the checkpoints are converted for, demo_vlm.yaml's (they load at any other too)


def check_out(out: Path) -> None:
    """Before any compute: refuse an ``--out`` holding directories the demo did not make."""
    from megatron_gndpo.checkpoint.integrity import foreign_files

    check_owned_dir(out / "gndpo", MARKER)
    for role in SFT:
        check_owned_dir(out / f"hf_{role}", RECIPE_FILE)
        foreign = foreign_files(out / role)
        if foreign:
            raise DemoError(f"{out / role} holds files the demo did not write ({', '.join(foreign[:5])}); "
                            "refusing to replace it. Move them away or choose another --out.")


def main(argv=None):
    args = demo_arguments(argv, __doc__, DEFAULT_CONFIG, REPO / "outputs" / "demo_vlm", check_out, "demo-vlm")
    out = args.out
    env = checkout_env()
    for role, recipe in SFT.items():
        hf_dir = out / f"hf_{role}"
        run_command([sys.executable, SFT_SCRIPT, "--role", role, "--steps", str(recipe["steps"]),
                     "--lr", str(recipe["lr"]), "--decay", recipe["decay"], "--threads", str(SFT_THREADS),
                     "--out", str(hf_dir)], env)
        # --overwrite replaces only an earlier conversion (check_out has made sure)
        run_command([sys.executable, "-m", "megatron_gndpo.cli", "convert", "hf-to-megatron", "--hf", str(hf_dir),
                     "--out", str(out / role), "--tp", str(TP), "--overwrite"], env)
    teacher_acc = json.loads((out / "hf_teacher" / RECIPE_FILE).read_text())["val_acc"]

    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread per rank: the count stays fixed
    run_dir = out / "gndpo"
    fresh_run_dir(run_dir)
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "-m",
                 "megatron_gndpo.train", "--config", args.config, f"trainer.output_dir={run_dir}",
                 f"teacher.checkpoint={out / 'teacher'}", f"student_checkpoint={out / 'student'}",
                 *args.overrides], env)
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_runs({"gndpo": rows}, out / "gndpo.png")
    acc = [r["val/acc"] for r in rows if "val/acc" in r]
    print("gndpo: held-out accuracy per validation: " + " ".join(f"{v:.3f}" for v in acc))
    print(f"plot: {out / 'gndpo.png'}")
    print(f"student accuracy: {acc[0]:.3f} -> {acc[-1]:.3f} (teacher {teacher_acc:.3f})")


if __name__ == "__main__":
    main()
