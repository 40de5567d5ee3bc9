"""`make demo-vlm`'s machinery: the bundled counting pictures hold the answer, and the whole demo (warm-ups,
conversion, a GNDPO step with images, the last line) runs, cut to a few steps."""

import importlib.util
import io

import pytest

from megatron_gndpo import demo_vlm
from tests.trainer_setup import REPO


def _make_data():
    """examples/counting/make_data.py, a script rather than a package module."""
    spec = importlib.util.spec_from_file_location("counting_make_data", REPO / "examples" / "counting" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _occupied_cells(png: bytes) -> int:
    """Cells of the 4 x 4 grid holding a shape: shapes are drawn in channels below 150, backgrounds at 200+."""
    import numpy as np
    from PIL import Image

    cell, grid = _make_data().CELL, _make_data().GRID
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    dark = pixels.max(axis=-1) < 200
    return sum(bool(dark[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].any())
               for r in range(grid) for c in range(grid))


def test_counting_data_holds_the_answer_in_the_picture_only(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoTokenizer

    from megatron_gndpo.data.prompts import PromptDataset
    from megatron_gndpo.data.vision import load_vision_processor

    make_data = _make_data()
    tokenizer_dir = REPO / "examples" / "counting" / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    processor = load_vision_processor(str(tokenizer_dir), tok)
    # val as the trainer opens it: every picture decodes, every prompt is the same 8 tokens (the picture's 4
    # among them), so the count is only in the picture
    val = PromptDataset([str(REPO / "examples" / "counting" / "data" / "val.parquet")], tok, max_prompt_length=16,
                        images="process", processor=processor)
    assert len(val) == make_data.VAL_SIZE
    assert {tuple(val.prompt_ids(i)) for i in range(len(val))} == {tuple(tok.convert_tokens_to_ids(
        ["<img>"] + ["<IMG_CONTEXT>"] * 4 + ["</img>", "n", "="]))}
    assert val.image_inputs(0).pixel_values.shape == (1, 3, 28, 28)
    # both splits: all counts occur, and a picture holds as many shapes as its answer says
    for split, size in (("train", make_data.TRAIN_SIZE), ("val", make_data.VAL_SIZE)):
        rows = pq.read_table(REPO / "examples" / "counting" / "data" / f"{split}.parquet").to_pylist()
        assert len(rows) == size and all(r["prompt"] == [{"role": "user", "content": "<image>n="}] for r in rows)
        assert {r["reward_model"]["ground_truth"] for r in rows} == {str(n) for n in range(1, 10)}
        for r in rows[:100]:
            assert _occupied_cells(r["images"][0]["bytes"]) == int(r["reward_model"]["ground_truth"])

    # the script makes the committed pictures (compared as pixels: PNG encoders may differ in bytes)
    make_data.main(["--out", str(tmp_path), "--train", "5", "--val", "5"])
    for split in ("train", "val"):
        ours = pq.read_table(tmp_path / "data" / f"{split}.parquet").to_pylist()
        committed = pq.read_table(REPO / "examples" / "counting" / "data" / f"{split}.parquet").to_pylist()[:5]
        for a, b in zip(ours, committed, strict=True):
            assert a["reward_model"] == b["reward_model"]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(a["images"][0]["bytes"]))),
                                  np.asarray(Image.open(io.BytesIO(b["images"][0]["bytes"]))))
    for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json"):
        assert (tmp_path / "tokenizer" / name).read_text() == (tokenizer_dir / name).read_text(), name


def _convert_and_step(groups, tmp: str, config: str, tp: int):
    """The warm-up's output converted as the demo converts it, then one step and a validation of
    ``demo_vlm.yaml``."""
    from megatron_gndpo.checkpoint import convert
    from megatron_gndpo.config import load_config
    from megatron_gndpo.distributed.init import destroy_parallel
    from megatron_gndpo.trainer.trainer import Trainer

    for role in ("student", "teacher"):
        convert.hf_to_megatron(f"{tmp}/hf_{role}", f"{tmp}/{role}", tp=tp)
    destroy_parallel(destroy_process_group=False)  # the trainer builds its own groups
    data = REPO / "examples" / "counting"
    cfg = load_config(config, [
        f"student_checkpoint={tmp}/student", f"teacher.checkpoint={tmp}/teacher", f"trainer.output_dir={tmp}/run",
        f"data.train_files=[{data}/data/train.parquet]", f"data.val_files=[{data}/data/val.parquet]",
        f"data.tokenizer={data}/tokenizer", "parallel.tensor_model_parallel_size=1", "trainer.steps=1",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=8", "trainer.val_prompts=4",
        "trainer.progress=false", "trainer.tensorboard=false"])
    trainer = Trainer(cfg)
    metrics, val = trainer.train_step(), trainer.validate()
    trainer.close(destroy_process_group=False)
    return metrics, val


@pytest.mark.distributed
def test_demo_vlm_pieces_run(tmp_path, capsys):
    """The warm-up script, the conversion and a GNDPO step with images on demo_vlm.yaml, cut to a few steps
    (in this process where they can be: the demo's own subprocesses would import torch five times)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tests.harness import run_distributed

    spec = importlib.util.spec_from_file_location("counting_sft", REPO / demo_vlm.SFT_SCRIPT)
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    sft.main(["--role", "student", "--steps", "2", "--batch", "8", "--out", str(tmp_path / "hf_student")])
    assert "held-out accuracy" in capsys.readouterr().out
    recipe = json.loads((tmp_path / "hf_student" / demo_vlm.RECIPE_FILE).read_text())
    sft.main(["--role", "student", "--steps", "2", "--batch", "8", "--out", str(tmp_path / "hf_student")])
    assert "cached" in capsys.readouterr().out  # the demo's cache: same recipe, not retrained
    assert 0.0 <= recipe["val_acc"] <= 1.0
    # the teacher: the student's weights moved (an equal teacher gives zero log-ratios and no gradient)
    shutil.copytree(tmp_path / "hf_student", tmp_path / "hf_teacher")
    weights = load_file(tmp_path / "hf_teacher" / "model.safetensors")
    torch.manual_seed(0)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()},
              tmp_path / "hf_teacher" / "model.safetensors", metadata={"format": "pt"})
    metrics, val = run_distributed(_convert_and_step, 1,
                                   args=(str(tmp_path), str(demo_vlm.DEFAULT_CONFIG), demo_vlm.TP))[0]
    assert metrics["estimator/valid_tokens"] > 0 and metrics["actor/grad_norm"] > 0
    assert metrics["prompt/length_max"] == 8  # the picture's 4 tokens and <img>, </img>, "n", "="
    assert 0.0 <= val["val/acc"] <= 1.0


def test_demo_vlm_refuses_foreign_directories(tmp_path):
    (tmp_path / "hf_student").mkdir()
    (tmp_path / "hf_student" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="hf_student.*refusing"):
        demo_vlm.main(["--out", str(tmp_path)])  # before any training
    assert (tmp_path / "hf_student" / "notes.txt").read_text() == "mine"
