"""Step metrics: what the rollout's rows measure (global over data parallelism), and where metrics go:
a JSONL file (always), TensorBoard, W&B, and progress on stdout (a rich progress bar on a terminal,
one plain line per step otherwise).

Only the logging rank (the last global rank: it holds the losses, which live on the last pipeline
stage) writes; every line is flushed as it is written, so a crash loses nothing already logged.

``output_dir`` holds one run's history and its resolved configuration (``config.yaml``). A resumed
run continues it: lines and TensorBoard events past the checkpoint's step belong to steps the run
redoes and are dropped. A fresh run into a directory that has an earlier run's metrics moves them
(and that run's ``config.yaml``) to ``previous_run_<time>/`` instead of appending to them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_gndpo.distributed.collectives import all_reduce
from megatron_gndpo.rollout.generator import Rollout

log = logging.getLogger(__name__)

PROGRESS_KEYS = (("reward", "reward"), ("score/std", "lr std"), ("actor/policy_loss", "loss"),
                 ("actor/grad_norm", "|g|"), ("perf/tokens_per_s", "tok/s"))
# One line per step off a terminal: (key, label, format)
LINE_KEYS = (("reward", "reward", ".4g"), ("score/std", "score_std", ".4g"), ("actor/policy_loss", "loss", ".4g"),
             ("actor/grad_norm", "grad_norm", ".4g"), ("actor/lr", "lr", ".3g"), ("time/step_s", "step_s", ".2f"),
             ("perf/tokens_per_s", "tokens_per_s", ".0f"), ("val/acc", "val_acc", ".4g"))


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

    def metrics(self) -> Dict[str, float]:
        return {f"time/{name}_s": sec for name, sec in self.seconds.items()}


def rollout_metrics(rollout: Rollout, rewards: Dict[str, torch.Tensor], group: ProcessGroup) -> Dict[str, float]:
    """Collective over ``group`` (data parallel): response and prompt lengths, truncation, reward,
    accuracy and format of the step's rows, and its token count (``perf/tokens``)."""
    resp, prompt = rollout.response_lengths.double(), rollout.prompt_lengths.double()
    n = torch.tensor(float(resp.numel()), dtype=torch.float64, device=resp.device)
    sums = all_reduce(torch.stack([n, resp.sum(), rollout.truncated.double().sum(), rewards["reward"].double().sum(),
                                   rewards["acc"].double().sum(), rewards["format"].double().sum(), prompt.sum()]),
                      dist.ReduceOp.SUM, group)
    ext = all_reduce(torch.stack([resp.max(), -resp.min(), prompt.max(), -prompt.min()]), dist.ReduceOp.MAX, group)
    n, resp_sum, truncated, reward, acc, fmt, prompt_sum = sums.tolist()
    resp_max, resp_neg_min, prompt_max, prompt_neg_min = ext.tolist()
    return {"response/length_mean": resp_sum / n, "response/length_max": resp_max, "response/length_min": -resp_neg_min,
            "response/truncated_frac": truncated / n, "reward": reward / n, "acc": acc / n, "format": fmt / n,
            "prompt/length_mean": prompt_sum / n, "prompt/length_max": prompt_max, "prompt/length_min": -prompt_neg_min,
            "perf/tokens": prompt_sum + resp_sum}


def _masked_moments(x: torch.Tensor, mask: torch.Tensor, group: ProcessGroup) -> Dict[str, float]:
    """Collective over ``group``: mean, (population) std, max and min of ``x`` over the tokens of ``mask``
    on every rank (float64; one SUM and one MAX all-reduce)."""
    m, x = mask.bool(), x.double()
    zero, big = torch.zeros((), dtype=torch.float64, device=x.device), torch.finfo(torch.float64).max
    sums = all_reduce(torch.stack([m.sum().double(), torch.where(m, x, zero).sum(), torch.where(m, x * x, zero).sum()]),
                      dist.ReduceOp.SUM, group)
    ext = all_reduce(torch.stack([torch.where(m, x, -big).max(), torch.where(m, -x, -big).max()]),
                     dist.ReduceOp.MAX, group)
    n, total, total_sq = sums.tolist()
    mean = total / n
    return {"mean": mean, "std": math.sqrt(max(total_sq / n - mean * mean, 0.0)), "max": ext[0].item(),
            "min": -ext[1].item()}


def advantage_metrics(advantages: torch.Tensor, mask: torch.Tensor, group: ProcessGroup) -> Dict[str, float]:
    """Collective over ``group``: the advantages' mean, std, max and min over the response tokens."""
    return {f"adv/{k}": v for k, v in _masked_moments(advantages, mask, group).items()}


def logprob_diff_metrics(rollout_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                         group: ProcessGroup) -> Dict[str, float]:
    """Collective over ``group``: ``|sampler's log-prob - recomputed old log-prob|`` of each response
    token, its max, mean and std. The two come from the same weights, so anything beyond rounding
    is a precision or engine mismatch between rollout and training (the rollout's KV-cached decode
    against the training forward)."""
    moments = _masked_moments((rollout_logprobs.double() - old_logprobs.double()).abs(), mask, group)
    return {f"rollout/logprob_diff_{k}": moments[k] for k in ("max", "mean", "std")}


JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CONFIG = "config.yaml"


def memory_metrics(device: torch.device) -> Dict[str, float]:
    """This rank's peak memory so far, in GiB: the CUDA caching allocator's high-water mark on a GPU
    (``memory/peak_allocated_gib``, what the planner's per-GPU estimate is compared with), the process's
    peak resident set on a CPU (``memory/peak_rss_gib``)."""
    if device.type == "cuda":
        return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}  # KiB on Linux


def set_aside_previous_run(output_dir: Path) -> Optional[Path]:
    """Moves an earlier run's metrics (JSONL, TensorBoard events) and configuration into
    ``previous_run_<time>/``, named after when they were last written; returns that directory, or None
    if there were none."""
    old = [output_dir / name for name in (JSONL, TENSORBOARD, CONFIG) if (output_dir / name).exists()]
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in old)))
    dest, n = output_dir / f"previous_run_{stamp}", 1
    while dest.exists():
        dest, n = output_dir / f"previous_run_{stamp}_{n}", n + 1
    dest.mkdir()
    for p in old:
        p.rename(dest / p.name)
    log.warning("%s held metrics of an earlier run; moved them to %s", output_dir, dest)
    return dest


def truncate_history(path: Path, last_step: int) -> int:
    """Keeps the lines of ``path`` up to step ``last_step`` (a half-written last line from a crash
    is dropped too); replaced atomically. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= last_step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def step_line(step: int, total_steps: int, metrics: Dict[str, float]) -> str:
    """``step 3/10 reward 0.4 score_std 1.3 ...``: the step's key numbers as one plain line."""
    return " ".join([f"step {step}/{total_steps}"] + [f"{label} {metrics[k]:{fmt}}" for k, label, fmt in LINE_KEYS
                                                      if k in metrics])


def write_config(path: Path, config: dict) -> None:
    """The run's resolved configuration as YAML (replaced atomically)."""
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, output_dir: str, *, total_steps: int, start_step: int, tensorboard: bool,
                 wandb_project: Optional[str], progress: bool, config: dict, title: str = "train"):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            set_aside_previous_run(self.dir)
        elif truncate_history(self.dir / JSONL, start_step):
            log.warning("%s: dropped the lines after step %d, which this resumed run redoes", self.dir / JSONL,
                        start_step)
        write_config(self.dir / CONFIG, config)
        self.jsonl = open(self.dir / JSONL, "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events from steps after the checkpoint, which a resumed run redoes
            self.tb = SummaryWriter(str(self.dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("trainer.wandb_project is set but wandb is not installed "
                                  "(pip install 'megatron-gndpo[wandb]')") from e
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(self.dir), resume="allow")
        self.total_steps = total_steps
        self.progress = None
        # A progress bar redrawn in place is unreadable in a log file: off a terminal, one line per step.
        self.plain_lines = progress and not sys.stdout.isatty()
        if progress and not self.plain_lines:
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
        if self.plain_lines:
            print(step_line(step, self.total_steps, metrics), flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
