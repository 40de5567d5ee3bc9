"""What a run checks before compute, in one process: config types and lengths, overlong prompts,
the run lock, writable directories, the refusal to overwrite an earlier run, progress lines off a
terminal, the resolved config on disk, and the dry run's parameter counts."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gndpo.config import load_config
from megatron_gndpo.config.loader import config_changes
from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.data.prompts import PromptDataset, verl_row, write_prompt_parquet
from megatron_gndpo.data.tokenizer import load_tokenizer
from megatron_gndpo.trainer.dry_run import describe_run, parameter_count
from megatron_gndpo.trainer.metrics import MetricsWriter
from megatron_gndpo.trainer.preflight import SetupError, agree, claim_run, describe_write_failure, probe_writable
from megatron_gndpo.trainer.run_lock import LOCK_FILE, LockHolder, RunLock, read_holder
from tests.trainer_setup import REPO, TOKENIZER


# --- the config loader checks types against the dataclass fields ------------------------------------

@pytest.mark.parametrize("override,message", [
    ("trainer.steps=true", "config key trainer.steps must be int, got True"),
    ("trainer.steps=2.0", "config key trainer.steps must be int, got 2.0"),
    ("data.train_files=5", "config key data.train_files must be a list, got 5"),
    ("data.train_files=[a.parquet, 5]", r"config key data.train_files\[1\] must be str, got 5"),
    ("optim.lr=true", "config key optim.lr must be float, got True"),
    ("data.tokenizer=123", r"config key data.tokenizer must be str, got 123 \(int\) \(or null\)"),
    ("precision.fp8=1", r"config key precision.fp8 must be one of \('e4m3', 'hybrid'\), got 1"),
    ("algorithm.estimator_kwargs=5", "config key algorithm.estimator_kwargs must be a mapping"),
    ("trainer.progress=1", "config key trainer.progress must be bool, got 1"),
])
def test_loader_refuses_a_value_of_the_wrong_type_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_loader_keeps_what_yaml_cannot_say_exactly():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.min_lr=0", "data.train_files=one.parquet",
                             "teacher.quantize=null", "algorithm.estimator_kwargs={score_clip: 3}"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.min_lr, float)
    assert cfg.data.train_files == ["one.parquet"] and cfg.teacher.quantize is None
    assert cfg.algorithm.estimator_kwargs == {"score_clip": 3}


def test_prompt_plus_response_must_fit_both_models():
    with pytest.raises(ValueError, match=r"data.max_prompt_length \(256\) \+ rollout.max_new_tokens \(300\) = 556 "
                                         r"exceeds model.max_position_embeddings \(512\)"):
        load_config(None, ["rollout.max_new_tokens=300"])
    with pytest.raises(ValueError, match=r"exceeds teacher.model.max_position_embeddings \(300\)"):
        load_config(None, ["teacher.model.max_position_embeddings=300"])
    for name in ("demo", "geo3k_gndpo", "geo3k_opd", "geo3k_gndpo_internvl", "geo3k_gndpo_qwen25vl"):
        load_config(REPO / "examples" / "configs" / f"{name}.yaml")


def test_config_changes_name_dotted_keys():
    old = {"trainer": {"steps": 2, "save_dir": None}, "optim": {"lr": 1e-3}}
    new = {"trainer": {"steps": 4, "save_dir": None}, "optim": {"lr": 1e-3}}
    assert config_changes(old, new) == ["trainer.steps: 2 -> 4"]


# --- every prompt is measured when the data is opened -----------------------------------------------

def _prompts(path: Path, contents) -> str:
    write_prompt_parquet(str(path), [verl_row([{"role": "user", "content": c}], "1", data_source="t")
                                     for c in contents])
    return str(path)


def test_overlong_prompt_is_an_error_naming_file_row_and_length(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    short = _prompts(tmp_path / "a.parquet", ["1+1=", "2+2="])
    mixed = _prompts(tmp_path / "b.parquet", ["1+1=", "12+34=", "5+5=", "123+4="])
    with pytest.raises(ValueError, match=r"b\.parquet: row 1: the prompt is 6 tokens, longer than "
                                         r"data.max_prompt_length \(5\); 2 of 6 prompts are"):
        PromptDataset([short, mixed], tok, max_prompt_length=5)
    data = PromptDataset([short, mixed], tok, max_prompt_length=5, overlong="drop")
    assert len(data) == 4 and data.dropped == 2
    assert [r.index for r in data.rows] == [0, 1, 2, 3] and data.rows[3].file_row == 2
    assert [len(data.prompt_ids(i)) for i in range(4)] == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="every prompt of .* is longer than data.max_prompt_length"):
        PromptDataset([mixed], tok, max_prompt_length=3, overlong="drop")


# --- the run lock -------------------------------------------------------------------------------------

def _holder_of(pid: int, host: str | None = None) -> LockHolder:
    import psutil

    return LockHolder(pid, host or socket.gethostname(), "earlier", psutil.Process(pid).create_time())


def _write_lock(directory: Path, holder: LockHolder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps(holder.__dict__))
    return directory / LOCK_FILE


def test_lock_names_this_process_and_is_released(tmp_path):
    lock = RunLock.acquire(tmp_path / "run")
    holder = read_holder(tmp_path / "run" / LOCK_FILE)
    assert holder.pid == os.getpid() and holder.host == socket.gethostname()
    assert RunLock.acquire(tmp_path / "run").holder == holder  # this process again: the same run
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_crash_while_the_lock_is_written_leaves_no_lock(tmp_path, monkeypatch):
    """The lock is linked into place only when complete: a crash while writing it (here, while its
    contents are serialised) leaves no run.lock behind to refuse the next launch."""
    from megatron_gndpo.trainer import run_lock

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("killed while writing the lock")

    monkeypatch.setattr(run_lock.dataclasses, "asdict", crash)
    with pytest.raises(KeyboardInterrupt):
        RunLock.acquire(tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock.acquire(tmp_path).release()


def test_lock_of_a_running_process_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = _write_lock(tmp_path, _holder_of(other.pid))
        with pytest.raises(ValueError, match=f"in use by another run: pid {other.pid} on host .* still runs"):
            RunLock.acquire(tmp_path)
        assert read_holder(path).pid == other.pid
    finally:
        other.kill()
        other.wait()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    holder = _holder_of(gone.pid)
    gone.wait()
    path = _write_lock(tmp_path, holder)
    with caplog.at_level(logging.WARNING):
        lock = RunLock.acquire(tmp_path)
    assert f"taking over the lock of pid {gone.pid}" in caplog.text
    assert read_holder(path).pid == os.getpid()
    lock.release()


def test_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    path = _write_lock(tmp_path, LockHolder(4242, "node-17", "yesterday", 1.0))
    with pytest.raises(ValueError, match=f"names pid 4242 on host node-17 .* If that run has ended, delete {path}"):
        RunLock.acquire(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="exists but is not a run lock"):
        RunLock.acquire(tmp_path)


# --- writable directories, and what a failed write says ---------------------------------------------

def test_probe_names_the_directory_and_errno(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"\[Errno 20\] trainer.save_dir .*file/ckpt is not writable") as info:
        probe_writable(tmp_path / "file" / "ckpt", "trainer.save_dir")
    assert info.value.errno == errno.ENOTDIR
    probe_writable(tmp_path / "ok", "trainer.save_dir")
    assert list((tmp_path / "ok").iterdir()) == []


def test_write_failure_without_an_os_error_is_probed(tmp_path):
    (tmp_path / "file").write_text("")
    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    text = describe_write_failure(lost, tmp_path / "file" / "ckpt", "trainer.save_dir")
    assert "unexpected pos" in text and "[Errno 20]" in text
    try:
        raise RuntimeError("wrapped") from OSError(errno.ENOSPC, "No space left on device", "/ckpt/x.distcp")
    except RuntimeError as e:
        assert describe_write_failure(e, tmp_path, "trainer.save_dir") == \
            "[Errno 28] No space left on device: '/ckpt/x.distcp'"


def test_agree_in_one_process():
    assert agree("adding", lambda: 1 + 1) == 2
    with pytest.raises(SetupError, match="opening the data: no rows"):
        agree("opening the data", lambda: (_ for _ in ()).throw(ValueError("no rows")))
    with pytest.raises(ZeroDivisionError):  # a bug keeps its type and traceback
        agree("dividing", lambda: 1 / 0)


# --- a fresh run does not overwrite an earlier run's checkpoints --------------------------------------

class _Checkpoints:
    def __init__(self, root: Path):
        self.root = root

    def resume_point(self):
        return None


def test_fresh_run_over_checkpoints_is_refused_unless_overwrite(tmp_path, caplog):
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}/run"])
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "latest").write_text("step_00000002")
    with pytest.raises(SetupError, match="holds an earlier run's checkpoints .latest: step_00000002.*--resume.*"
                                         "trainer.overwrite=true"):
        claim_run(cfg.trainer, _Checkpoints(root), resume=False)
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # a refused run leaves no lock behind
    assert (root / "latest").read_text() == "step_00000002"
    overwrite = load_config(None, [f"trainer.output_dir={tmp_path}/run", "trainer.overwrite=true"])
    with caplog.at_level(logging.WARNING):
        claim = claim_run(overwrite.trainer, _Checkpoints(root), resume=False)
    assert claim.start_step == 0 and "replaces the checkpoints" in caplog.text
    assert read_holder(tmp_path / "run" / LOCK_FILE).pid == os.getpid()
    claim.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_checkpoint_dir_elsewhere_is_locked_too(tmp_path):
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}/run", f"trainer.save_dir={tmp_path}/ckpt"])
    claim = claim_run(cfg.trainer, _Checkpoints(tmp_path / "ckpt"), resume=False)
    assert (tmp_path / "run" / LOCK_FILE).exists() and (tmp_path / "ckpt" / LOCK_FILE).exists()
    claim.release()


# --- logs off a terminal, and the resolved config ------------------------------------------------------

def test_progress_off_a_terminal_is_one_plain_line_per_step(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), total_steps=3, start_step=0, tensorboard=False, wandb_project=None,
                           progress=True, config={"trainer": {"steps": 3}})
    writer.log(1, {"reward": 0.25, "score/std": 1.5, "actor/grad_norm": 0.5, "time/step_s": 2.0,
                   "perf/tokens_per_s": 812.4})
    writer.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 1/3 reward 0.25 score_std 1.5 grad_norm 0.5 step_s 2.00 tokens_per_s 812"]
    assert (tmp_path / "config.yaml").read_text() == "trainer:\n  steps: 3\n"


# --- --print-config -------------------------------------------------------------------------------------

def test_parameter_counts_of_known_models():
    qwen3_1_7b = ModelConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, intermediate_size=6144, qk_layernorm=True,
                             tie_word_embeddings=True, max_position_embeddings=4096)
    count = parameter_count(qwen3_1_7b)
    # the model card's "1.7B, 1.4B non-embedding"; the layer count is checked on a built model in tests/distributed
    assert count["embedding"] == 151936 * 2048 and count["layers"] == 28 * 50_336_000
    assert count["total"] == 1_720_574_976
    cfg = load_config(REPO / "examples" / "configs" / "geo3k_gndpo.yaml")
    text = describe_run(cfg, world_size=8)
    assert "# layout: world 8 = TP 2 x PP 1 x CP 1 x DP 4" in text and "# student: 1.721 B parameters" in text
    assert "# memory per rank, roughly:" in text and "teacher.offload" in text
    # context parallelism takes its share of the world and of each sequence's activations
    cp2 = load_config(REPO / "examples" / "configs" / "geo3k_gndpo.yaml", ["parallel.context_parallel_size=2"])
    assert "# layout: world 8 = TP 2 x PP 1 x CP 2 x DP 2" in describe_run(cp2, world_size=8)
    assert "this run would not start" in describe_run(cp2, world_size=6)


def test_print_config_shows_the_teachers_own_layout():
    """teacher.parallel: --print-config names the teacher's layout and counts its memory on it."""
    cfg = load_config(REPO / "examples" / "configs" / "geo3k_gndpo.yaml",
                      ["teacher.parallel.tensor_model_parallel_size=4"])
    text = describe_run(cfg, world_size=8)
    assert "# teacher layout (teacher.parallel): TP 4 x PP 1 x DP 2" in text and "teacher rows exchanged" in text
    assert "this run would not start" in describe_run(cfg, world_size=6)


def test_command_line_print_config_and_a_config_mistake(capsys):
    from megatron_gndpo import cli

    demo = str(REPO / "examples" / "configs" / "demo.yaml")
    # overrides on both sides of a flag; --print-config builds nothing and exits 0
    assert cli.main(["train", "--config", demo, "trainer.steps=3", "--print-config", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "\n  steps: 3\n" in out and "\n  lr: 0.001\n" in out and "# layout: world 1 = TP 2" not in out
    assert "world size 1 is not divisible by TP 2" in out
    assert cli.main(["train", "--config", demo, "trainer.steps=true"]) == 2
    assert capsys.readouterr().err == "error: config key trainer.steps must be int, got True (a boolean)\n"
