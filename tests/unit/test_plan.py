"""``megatron-gndpo plan``: parameter counts against transformers, the calibration figures reproduced, the
JSON schema as documented, and the command line on a Hugging Face config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from megatron_gndpo.config.schema import ModelConfig
from megatron_gndpo.planning.hardware import GIB, GPUS
from megatron_gndpo.planning.memory import estimate_memory
from megatron_gndpo.planning.model import parameter_count
from megatron_gndpo.planning.timing import estimate_time
from megatron_gndpo.planning.workload import Layout, Workload

REPO = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=704, max_position_embeddings=512)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_match_transformers(family, tied):
    import transformers

    from megatron_gndpo.checkpoint.hf_mapping import FAMILY_TRAITS, model_config_from_hf

    extra = {"head_dim": 48} if family == "qwen3" else {}  # Qwen3's head_dim is not hidden / heads
    hf = getattr(transformers, FAMILY_TRAITS[family][0])(**SHAPE, **extra, tie_word_embeddings=tied)
    with torch.device("meta"):
        expected = transformers.AutoModelForCausalLM.from_config(hf).num_parameters()
    assert parameter_count(model_config_from_hf(hf), padded_vocab=False)["total"] == expected


QWEN25_05B = ModelConfig(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, attention_bias=True, tie_word_embeddings=True,
                         max_position_embeddings=4096)
QWEN25_15B = ModelConfig(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, attention_bias=True, tie_word_embeddings=True,
                         max_position_embeddings=4096)


def test_the_h100_gndpo_step_of_docs_benchmarks_is_reproduced():
    """docs/benchmarks.md, "One whole GNDPO step": 0.5B student, 1.5B teacher, 8 x 8 rows of 256 + 512
    tokens, micro-batch 8, one H100: 27.30 s per step, 1,808 tokens/s, 25.4 GiB peak."""
    work = Workload(prompts_per_step=8, samples=8, max_prompt=256, max_response=512, micro_batch_size=8,
                    distributed_optimizer=False)
    layout, gpu = Layout(tp=1, pp=1, dp=1), GPUS["h100"]
    time = estimate_time(QWEN25_05B, QWEN25_15B, layout, work, gpu)
    memory = estimate_memory(QWEN25_05B, QWEN25_15B, layout, work, gpu)
    assert abs(time.step_s / 27.30 - 1) < 0.15 and time.decode_bound == "host"
    assert abs(time.tokens_per_s_per_gpu(1) / 1808 - 1) < 0.15
    assert abs(memory.peak / GIB / 25.4 - 1) < 0.15


def test_the_h100_training_peak_of_docs_benchmarks_is_reproduced():
    """docs/benchmarks.md, "Student train step": 1.5B, TE BF16, one 4096-token sequence per micro-batch,
    megatron's optimizer without ZeRO: 42.5 GiB peak (weights, gradients, optimizer, one pass)."""
    work = Workload(prompts_per_step=4, samples=1, max_prompt=4096, max_response=0, micro_batch_size=1,
                    distributed_optimizer=False)
    m = estimate_memory(QWEN25_15B, QWEN25_15B, Layout(tp=1, pp=1, dp=1), work, GPUS["h100"])
    used = ("student weights", "student gradients", "optimizer state", "activations", "logits")
    assert abs(sum(m.parts[p] for p in used) / GIB / 42.5 - 1) < 0.15


def test_a_token_budget_plans_as_many_tokens_per_pass_as_its_rows():
    """A budget of k full-length rows plans as micro_batch_size k (the bound of a packed or padded budgeted
    pass); a budget between row counts scales activations and logits with its tokens, and fewer rows per
    pass mean more micro-batches (the scoring phases' TP all-reduces and the PP bubble)."""
    base = dict(prompts_per_step=8, samples=8, max_prompt=256, max_response=512, distributed_optimizer=False)
    layout, gpu = Layout(tp=2, pp=2, dp=1), GPUS["h100"]
    rows2 = estimate_memory(QWEN25_05B, QWEN25_15B, layout, Workload(micro_batch_size=2, **base), gpu)
    budget = estimate_memory(QWEN25_05B, QWEN25_15B, layout,
                             Workload(micro_batch_size=16, max_tokens_per_microbatch=2 * 768, **base), gpu)
    assert budget.parts == rows2.parts
    half = estimate_memory(QWEN25_05B, QWEN25_15B, layout,
                           Workload(micro_batch_size=16, max_tokens_per_microbatch=3 * 768, **base), gpu)
    assert half.parts["teacher activations and logits"] == 1.5 * rows2.parts["teacher activations and logits"]
    t2 = estimate_time(QWEN25_05B, QWEN25_15B, layout, Workload(micro_batch_size=2, **base), gpu)
    t8 = estimate_time(QWEN25_05B, QWEN25_15B, layout, Workload(max_tokens_per_microbatch=8 * 768, **base), gpu)
    assert t8.phases["teacher scoring"] < t2.phases["teacher scoring"]
    with pytest.raises(ValueError, match="must hold a full-length row"):
        Workload(max_tokens_per_microbatch=700, **base)


def test_the_teacher_on_its_own_layout_is_planned_on_it():
    """teacher.parallel: the teacher's weights, activations and forward are those of its own TP x PP (as a
    student layout of those sizes would give them), plus the exchanged rows; a layout it cannot split is
    rejected naming it; a run config's teacher.parallel reaches the workload."""
    from megatron_gndpo.config.loader import load_config
    from megatron_gndpo.planning.layouts import layout_problems
    from megatron_gndpo.planning.memory import teacher_weight_bytes
    from megatron_gndpo.planning.workload import workload_from_config

    student, teacher = ModelConfig(**SHAPE), ModelConfig(**{**SHAPE, "hidden_size": 512, "num_hidden_layers": 4})
    base = dict(prompts_per_step=8, samples=4, max_prompt=128, max_response=256)
    own, same = Workload(**base, teacher_tp=4, teacher_pp=2), Workload(**base)
    student_layout, teacher_layout = Layout(tp=1, pp=1, dp=8), Layout(tp=4, pp=2, dp=1)
    assert own.teacher_layout(student_layout) == teacher_layout
    got = estimate_memory(student, teacher, student_layout, own, GPUS["h100"])
    want = estimate_memory(student, teacher, teacher_layout, same, GPUS["h100"])
    assert got.parts["teacher weights (resident)"] == teacher_weight_bytes(teacher, teacher_layout, same)
    assert got.parts["teacher activations and logits"] == want.parts["teacher activations and logits"]
    assert got.parts["teacher rows exchanged"] == 32 * 384 * (12 + 4)
    assert estimate_memory(student, teacher, student_layout, same, GPUS["h100"]).parts["teacher rows exchanged"] == 0
    assert (estimate_time(student, teacher, student_layout, own, GPUS["h100"]).phases["teacher scoring"]
            > estimate_time(student, teacher, teacher_layout, same, GPUS["h100"]).phases["teacher scoring"])
    assert any("teacher's TP 3" in p for p in layout_problems(student, teacher, student_layout,
                                                             Workload(**base, teacher_tp=3), GPUS["h100"]))
    assert any("teacher.num_hidden_layers (4) is not divisible by PP 8" in p for p in layout_problems(
        student, teacher, student_layout, Workload(**base, teacher_pp=8), GPUS["h100"]))
    cfg = load_config(None, ["teacher.parallel.tensor_model_parallel_size=2"])
    assert (workload_from_config(cfg).teacher_tp, workload_from_config(cfg).teacher_pp) == (2, 1)
    assert layout_problems(student, teacher, Layout(tp=1, pp=1, cp=2, dp=4), same, GPUS["h100"]) == []
    assert layout_problems(student, teacher, Layout(tp=1, pp=1, cp=2, dp=4), Workload(**base, teacher_tp=2),
                           GPUS["h100"]) == [
        "context parallelism with the teacher on its own layout (teacher.parallel) is not built"]
    assert workload_from_config(load_config(None, [])).teacher_tp is None


def _write_hf(path: Path, **fields) -> Path:
    from transformers import Qwen3Config

    path.mkdir(parents=True)
    Qwen3Config(**{**SHAPE, "head_dim": 32, **fields}).save_pretrained(path)
    return path


def _documented_keys() -> set:
    text = (REPO / "docs" / "planning.md").read_text()
    return set(re.findall(r"^\| `([a-z0-9_.*]+)` \|", text, flags=re.M))


def _keys(value, prefix="") -> set:
    """Dotted keys of a plan, list entries as ``*`` and the free-form part names left out."""
    out = set()
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{prefix}{k}"
            out.add(key)
            if not key.endswith(("parts", "phases", "activations")) and key not in ("workload", "calibration", "best"):
                out |= _keys(v, key + ".")
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        out |= _keys(value[0], prefix[:-1] + ".*.")
    return out


def test_command_line_on_hugging_face_configs(tmp_path, capsys):
    from megatron_gndpo import cli

    student = _write_hf(tmp_path / "student", tie_word_embeddings=True)
    teacher = _write_hf(tmp_path / "teacher", hidden_size=512, num_hidden_layers=4)
    argv = ["plan", "--student", str(student), "--teacher", str(teacher), "--gpus", "4", "--gpu", "a100",
            "--max-prompt", "128", "--max-response", "256"]
    assert cli.main(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["schema"] == "megatron-gndpo.plan/1" and plan["gpu"]["name"] == "a100"
    assert plan["models"]["student"]["tied_embeddings"] and plan["models"]["student"]["lm_head"] == 0
    layouts = [(e["layout"]["tp"], e["layout"]["pp"]) for e in plan["layouts"]]
    assert sorted(layouts) == [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]
    assert plan["best"] == plan["layouts"][0]["layout"] and plan["layouts"][0]["rank"] == 1
    rejected = {(e["layout"]["tp"], e["layout"]["pp"]): e["rejected"] for e in plan["layouts"] if e["rejected"]}
    assert rejected[(1, 2)] == ["student.num_hidden_layers (3) is not divisible by PP 2"]
    assert rejected[(4, 1)] == ["student.num_key_value_heads (2) is not divisible by TP 4",
                                "teacher.num_key_value_heads (2) is not divisible by TP 4"]
    assert _keys(plan) == _documented_keys()

    assert cli.main(argv + ["--tp", "2", "--pp", "1"]) == 0
    text = capsys.readouterr().out
    assert "#1 TP2 PP1 CP1 DP2" in text and "student: " in text and "rejected" not in text
    # context parallelism is planned (activations shared by CP ranks), beside a teacher of its own layout refused
    assert cli.main(argv + ["--tp", "1", "--pp", "1", "--cp", "2", "--json"]) == 0
    (cp2,) = json.loads(capsys.readouterr().out)["layouts"]
    assert cp2["layout"] == {**cp2["layout"], "tp": 1, "pp": 1, "cp": 2, "dp": 2} and not cp2["rejected"]
    # a layout that does not fit is named with what does not fit; none fits: exit status 1
    assert cli.main(argv + ["--max-response", "2000000", "--tp", "1", "--pp", "1"]) == 1
    assert "out of memory: the " in capsys.readouterr().out
    assert cli.main(["plan", "--student", str(tmp_path), "--teacher", str(teacher), "--gpus", "2"]) == 2
    assert "no config.json" in capsys.readouterr().err
