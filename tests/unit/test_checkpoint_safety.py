"""What the checkpoint tools may delete and what they trust, without a distributed world: the
converter's --out rules, staged outputs, file manifests (sizes and hashes), the resume fall-back over
damaged checkpoints, keep_checkpoints' config check and model_config_from_checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest

from megatron_gndpo.checkpoint import integrity
from megatron_gndpo.checkpoint.dist_ckpt import (CheckpointManager, model_config_from_checkpoint, resolve_checkpoint,
                                                 write_meta)
from megatron_gndpo.checkpoint.integrity import (CheckpointIntegrityError, check_output_dir, checkpoint_problem,
                                                 file_manifest, foreign_files, verify_checkpoint)
from megatron_gndpo.config.schema import ModelConfig, TrainerConfig

REPO = Path(__file__).resolve().parents[2]
ARCH = ModelConfig(vocab_size=15, make_vocab_size_divisible_by=8, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64)


def _fake_checkpoint(path: Path, files=None, **extra) -> Path:
    """A directory shaped like a dist-checkpoint: files, then the metadata with their manifest."""
    path.mkdir(parents=True)
    for name, data in (files or {"__0_0.distcp": b"weights" * 100, ".metadata": b"meta",
                                 "tokenizer/tokenizer.json": b"{}"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    write_meta(path, ARCH, {"tp": 1, "pp": 1}, **extra, **file_manifest(path))
    return path


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _user_dir(path: Path) -> dict:
    """A folder of a user's: notes and another model."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my experiment notes")
    (path / "model.safetensors").write_bytes(b"another model")
    return _tree(path)


# --- --out rules ------------------------------------------------------------------------------------


def test_converter_refuses_an_out_holding_a_users_files(tmp_path):
    from megatron_gndpo.checkpoint import convert

    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    before = _user_dir(tmp_path / "mine")
    for call in (lambda: convert.megatron_to_hf(str(ckpt), str(tmp_path / "mine")),
                 lambda: convert.reshard(str(ckpt), str(tmp_path / "mine")),
                 lambda: convert.hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mine"))):
        with pytest.raises(FileExistsError, match="mine.*--overwrite"):
            call()
    assert _tree(tmp_path / "mine") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]  # no staging left behind


@pytest.mark.parametrize("out", ["same", "inside", "containing"])
def test_converter_refuses_an_out_overlapping_its_input(tmp_path, out):
    """Even with --overwrite: ``hf-to-megatron --hf X --out X`` used to delete the source model."""
    from megatron_gndpo.checkpoint import convert

    src = tmp_path / "models" / "src"
    hf = _user_dir(src)
    ckpt = _fake_checkpoint(tmp_path / "models" / "ckpt")
    meta = _tree(ckpt)
    target = {"same": "{}", "inside": "{}/sub", "containing": "{}/.."}[out]
    for call in (lambda: convert.hf_to_megatron(str(src), target.format(src), overwrite=True),
                 lambda: convert.megatron_to_hf(str(ckpt), target.format(ckpt), overwrite=True),
                 lambda: convert.reshard(str(ckpt), target.format(ckpt), overwrite=True)):
        with pytest.raises(ValueError, match="input"):
            call()
    assert _tree(src) == hf and _tree(ckpt) == meta


def test_out_rules_for_earlier_outputs_and_overwrite(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    assert check_output_dir(tmp_path / "new", [ckpt], overwrite=False) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", [ckpt], overwrite=False)
    earlier = _fake_checkpoint(tmp_path / "earlier", conversion={"command": "reshard", "source": str(ckpt)})
    check_output_dir(earlier, [ckpt], overwrite=False)  # this tool's own output: replaceable
    training = _fake_checkpoint(tmp_path / "training", step=3)  # ours, but not a conversion's
    with pytest.raises(FileExistsError, match="not an earlier output"):
        check_output_dir(training, [ckpt], overwrite=False)
    (earlier / "notes.txt").write_text("added later by the user")
    with pytest.raises(FileExistsError, match="notes.txt"):
        check_output_dir(earlier, [ckpt], overwrite=False)
    check_output_dir(earlier, [ckpt], overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_output_dir(tmp_path / "file", [ckpt], overwrite=True)


def test_staged_output_replaces_only_when_complete(tmp_path):
    from megatron_gndpo.checkpoint.convert import _staged_output

    src = tmp_path / "src"
    src.mkdir()
    earlier = _fake_checkpoint(tmp_path / "out", conversion={"command": "reshard", "source": str(src)})
    before = _tree(earlier)
    with pytest.raises(RuntimeError, match="killed"):
        with _staged_output(str(earlier), [src], overwrite=False) as staged:
            staged.mkdir()
            (staged / "half.distcp").write_bytes(b"x")
            raise RuntimeError("killed mid-way")
    assert _tree(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    with _staged_output(str(earlier), [src], overwrite=False) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
    assert _tree(earlier) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_staged_output_keeps_the_result_when_out_was_taken_meanwhile(tmp_path):
    from megatron_gndpo.checkpoint.convert import _staged_output

    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(FileExistsError, match="kept at") as err:
        with _staged_output(str(tmp_path / "out"), [src], overwrite=False) as staged:
            staged.mkdir()
            (staged / "result.bin").write_bytes(b"hours of work")
            _user_dir(tmp_path / "out")
    kept = Path(str(err.value).rsplit("kept at ", 1)[1])
    assert (kept / "result.bin").read_bytes() == b"hours of work"
    assert (tmp_path / "out" / "notes.txt").is_file()


def test_cli_refuses_and_exits_non_zero(tmp_path):
    """The reported case, end to end: `megatron-to-hf --out DIR` with a user's notes and model in DIR
    exited 0 after wiping it."""
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    before = _user_dir(tmp_path / "mine")
    run = subprocess.run([sys.executable, "-m", "tools.checkpoint_convert", "megatron-to-hf", "--megatron", str(ckpt),
                          "--out", str(tmp_path / "mine")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--overwrite" in run.stderr
    assert _tree(tmp_path / "mine") == before


# --- manifests ----------------------------------------------------------------------------------------


def test_sizes_catch_truncation_and_hashes_catch_flipped_bytes(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    verify_checkpoint(ckpt, hashes=True)
    meta = json.loads((ckpt / integrity.META_FILE).read_text())
    assert set(meta["files"]) == {"__0_0.distcp", ".metadata", "tokenizer/tokenizer.json"}
    assert meta["hash_algorithm"] == "sha256"  # xxhash is not installed here

    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_checkpoint(ckpt, hashes=False)  # same size: only the hash can tell
    with pytest.raises(CheckpointIntegrityError, match=r"__0_0\.distcp does not have the content"):
        verify_checkpoint(ckpt, hashes=True)

    shard.write_bytes(bytes(data[:-7]))
    with pytest.raises(CheckpointIntegrityError, match=r"__0_0\.distcp has 693 bytes where 700 were written"):
        verify_checkpoint(ckpt, hashes=False)
    (ckpt / ".metadata").unlink()
    assert "more damaged" in checkpoint_problem(ckpt, hashes=False)
    (ckpt / integrity.META_FILE).write_text('{"model": ')
    with pytest.raises(CheckpointIntegrityError, match="gndpo_meta.json is damaged"):
        verify_checkpoint(ckpt, hashes=False)


def test_xxhash_is_used_when_installed(tmp_path, monkeypatch):
    import hashlib

    fake = types.ModuleType("xxhash")
    fake.xxh3_128 = lambda: hashlib.blake2b(digest_size=16)
    monkeypatch.setitem(sys.modules, "xxhash", fake)
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    assert json.loads((ckpt / integrity.META_FILE).read_text())["hash_algorithm"] == "xxh3_128"
    verify_checkpoint(ckpt, hashes=True)
    monkeypatch.setitem(sys.modules, "xxhash", None)  # written where it was installed, checked where it is not
    with pytest.raises(CheckpointIntegrityError, match="pip install xxhash"):
        verify_checkpoint(ckpt, hashes=True)


def test_foreign_files(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    assert foreign_files(ckpt) == []
    (ckpt / "notes.txt").write_text("mine")
    assert foreign_files(ckpt) == ["notes.txt"]
    legacy = tmp_path / "legacy"  # a checkpoint from before manifests: recognised by its files' names
    legacy.mkdir()
    for name in ("__0_0.distcp", ".metadata", "common.pt", "metadata.json", integrity.META_FILE):
        (legacy / name).write_text("x")
    assert foreign_files(legacy) == []
    (legacy / "model.safetensors").write_text("x")
    assert foreign_files(legacy) == ["model.safetensors"]


# --- resume -------------------------------------------------------------------------------------------


def _run_root(tmp_path: Path, steps=(1, 2, 3)) -> Path:
    root = tmp_path / "checkpoints"
    for step in steps:
        _fake_checkpoint(root / f"step_{step:08d}", step=step)
    (root / "latest").write_text(f"step_{steps[-1]:08d}")
    return root


def _manager(root: Path) -> CheckpointManager:
    return CheckpointManager(root, layout={"tp": 1, "pp": 1, "dp": 1}, ranks={"tp": 0, "pp": 0, "dp": 0})


def test_resume_falls_back_from_a_damaged_latest_loudly(tmp_path, caplog, monkeypatch):
    root = _run_root(tmp_path)
    manager = _manager(root)
    assert manager.resume_point() == root / "step_00000003"
    shard = root / "step_00000003" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:50])  # truncated
    with caplog.at_level(logging.WARNING):
        assert manager.resume_point() == root / "step_00000002"
    warning = caplog.text
    assert "step_00000003/__0_0.distcp has 50 bytes" in warning and "resuming from" in warning
    assert str(root / "step_00000002") in warning

    shard = root / "step_00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    assert manager.resume_point() == root / "step_00000002"  # sizes only by default
    monkeypatch.setenv(integrity.VERIFY_HASHES_ENV, "1")
    assert manager.resume_point() == root / "step_00000001"
    (root / "step_00000001" / ".metadata").unlink()
    with pytest.raises(CheckpointIntegrityError, match="no intact checkpoint") as err:
        manager.resume_point()
    assert all(f"step_0000000{i}" in str(err.value) for i in (1, 2, 3))


def test_resume_never_picks_a_checkpoint_newer_than_latest(tmp_path):
    root = _run_root(tmp_path)
    (root / "latest").write_text("step_00000002")
    (root / "step_00000002" / ".metadata").unlink()
    assert _manager(root).resume_point() == root / "step_00000001"
    (root / "latest").write_text("../../etc")
    assert _manager(root).resume_point() == root / "step_00000003"  # a garbled pointer: the newest intact one
    assert _manager(tmp_path / "nothing").resume_point() is None


# --- config and architecture -----------------------------------------------------------------------


def test_keep_checkpoints_is_checked():
    assert TrainerConfig(keep_checkpoints=None).keep_checkpoints is None
    assert TrainerConfig(keep_checkpoints=2).keep_checkpoints == 2
    with pytest.raises(ValueError, match="trainer.keep_checkpoints must be >= 1"):
        TrainerConfig(keep_checkpoints=0)


def test_model_config_from_checkpoint(tmp_path):
    root = _run_root(tmp_path, steps=(1,))
    assert model_config_from_checkpoint(root / "step_00000001") == ARCH
    assert model_config_from_checkpoint(root) == ARCH  # a checkpoint root: through `latest`
    assert resolve_checkpoint(root) == root / "step_00000001"
    meta = root / "step_00000001" / integrity.META_FILE
    saved = json.loads(meta.read_text())
    del saved["model"]["rms_norm_eps"]  # a field the checkpoint predates takes its default
    meta.write_text(json.dumps(saved))
    assert model_config_from_checkpoint(root) == dataclasses.replace(ARCH, rms_norm_eps=ModelConfig().rms_norm_eps)
    saved["model"]["sliding_window"] = 128
    meta.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="sliding_window"):
        model_config_from_checkpoint(root)
    (root / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointIntegrityError, match="not a complete checkpoint"):
        resolve_checkpoint(root)
    with pytest.raises(FileNotFoundError, match="nor a checkpoint directory"):
        model_config_from_checkpoint(tmp_path)


def test_verify_command_reports_every_checkpoint_of_a_root(tmp_path):
    from megatron_gndpo.checkpoint.convert import verify

    root = _run_root(tmp_path, steps=(1, 2))
    shard = root / "step_00000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[::-1])  # same size, other content
    report = verify(str(root))
    assert report[str(root / "step_00000001")] == "ok"
    assert "does not have the content" in report[str(root / "step_00000002")]
    assert verify(str(root / "step_00000001")) == {str(root / "step_00000001"): "ok"}


def test_non_finite_check_looks_at_every_chunk():
    import torch

    from megatron_gndpo.checkpoint.convert import _all_finite, _check_finite

    t = torch.zeros(10)
    assert _all_finite(t, chunk=3) and _all_finite(torch.arange(5))  # integer tensors are always finite
    t[9] = float("-inf")
    assert not _all_finite(t, chunk=3)
    with pytest.raises(ValueError, match=r"'w' \(decoder layer 2\) has 0 NaN and 1 infinite"):
        _check_finite({"w": t}, " (decoder layer 2)")
