"""Where step metrics go: a JSONL file (always), TensorBoard, W&B, and a rich progress bar.

Only the logging rank (the last global rank: it holds the losses, which live on the last pipeline
stage) writes; every line is flushed as it is written, so a crash loses nothing already logged.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

PROGRESS_KEYS = (("reward", "reward"), ("score/std", "lr std"), ("actor/policy_loss", "loss"),
                 ("actor/grad_norm", "|g|"), ("perf/tokens_per_s", "tok/s"))


class PhaseTimer:
    """Wall-clock seconds per named phase of a step."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class MetricsWriter:
    def __init__(self, output_dir: str, *, total_steps: int, start_step: int, tensorboard: bool,
                 wandb_project: Optional[str], progress: bool, config: dict, title: str = "train"):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("trainer.wandb_project is set but wandb is not installed "
                                  "(pip install 'megatron-gndpo[wandb]')") from e
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(self.dir), resume="allow")
        self.progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.progress is not None:
            info = "  ".join(f"{label} {metrics[k]:.3g}" for k, label in PROGRESS_KEYS if k in metrics)
            self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
