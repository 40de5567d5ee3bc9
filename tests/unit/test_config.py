import pathlib

import pytest

from megatron_gndpo.config import ModelConfig, load_config

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_demo_config_loads_with_defaults_and_overrides():
    cfg = load_config(EXAMPLES / "demo.yaml", ["parallel.tensor_model_parallel_size=1", "optim.lr=0.5"])
    assert cfg.parallel.tensor_model_parallel_size == 1
    assert cfg.optim.lr == 0.5 and cfg.optim.clip_grad == 1.0  # from base.yaml
    assert cfg.teacher.model.hidden_size == 128
    assert cfg.teacher.precision == cfg.precision
    assert cfg.model.num_key_value_heads == 2 and cfg.model.head_dim == 16


def test_unknown_keys_and_bad_values_name_their_path():
    with pytest.raises(ValueError, match="unknown config key model.hiden_size"):
        load_config(EXAMPLES / "demo.yaml", ["model.hiden_size=3"])
    with pytest.raises(ValueError, match="precision.transformer_impl must be one of"):
        load_config(None, ["precision.transformer_impl=te"])
    with pytest.raises(ValueError, match="model.num_attention_heads .4. must be divisible by "
                                         "parallel.tensor_model_parallel_size .8."):
        load_config(None, ["parallel.tensor_model_parallel_size=8", "model.intermediate_size=64"])
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config(None, ["model.hidden_size"])


def test_padded_vocab_follows_megatron():
    m = ModelConfig(vocab_size=151936, make_vocab_size_divisible_by=128)
    assert m.padded_vocab_size(1) == 151936 and m.padded_vocab_size(8) == 152576


def test_teacher_quantisation_settings_are_checked():
    assert load_config(None, ["teacher.quantize=fp8"]).teacher.quantize == "fp8"
    with pytest.raises(ValueError, match="teacher.quantize must be one of"):
        load_config(None, ["teacher.quantize=int4"])
    with pytest.raises(ValueError, match="teacher.calibration_prompts must be an even number >= 2, got 7"):
        load_config(None, ["teacher.quantize=fp8", "teacher.calibration_prompts=7"])
    with pytest.raises(ValueError, match="two FP8 schemes"):
        load_config(None, ["teacher.quantize=fp8", "precision.fp8=hybrid",
                           "precision.transformer_impl=transformer_engine"])


def test_teacher_layout_defaults_to_the_students_and_refuses_what_it_cannot_do():
    """teacher.parallel: unset or the student's sizes is the student's layout; another is checked against the
    teacher's architecture and refuses, naming the key, what runs the teacher on the student's micro-batches."""
    same = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    assert not same.teacher_on_own_layout and same.teacher_parallel is same.parallel
    assert not load_config(None, ["teacher.parallel.tensor_model_parallel_size=1"]).teacher_on_own_layout
    own = load_config(None, ["teacher.parallel.tensor_model_parallel_size=2",
                             "teacher.parallel.pipeline_model_parallel_size=3"])
    assert own.teacher_on_own_layout
    layout = own.teacher_parallel
    assert (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size) == (2, 3)
    assert own.parallel.tensor_model_parallel_size == 1
    with pytest.raises(ValueError, match=r"teacher.model.num_hidden_layers \(3\) must be divisible by "
                                         r"teacher.parallel.pipeline_model_parallel_size \(2\)"):
        load_config(None, ["teacher.parallel.pipeline_model_parallel_size=2"])
    with pytest.raises(ValueError, match=r"teacher.parallel.tensor_model_parallel_size must be >= 1"):
        load_config(None, ["teacher.parallel.tensor_model_parallel_size=0"])
    own_tp = "teacher.parallel.tensor_model_parallel_size=2"
    for extra, what in ((["teacher.quantize=fp8"], "teacher.quantize"), (["data.images=process"], "data.images"),
                        (["algorithm.divergence.kind=rkl", "algorithm.divergence.weight=0.1"], "top_k")):
        with pytest.raises(ValueError, match=f"teacher.parallel.*{what}|{what}.*teacher.parallel"):
            load_config(None, [own_tp, *extra])
        load_config(None, extra)  # accepted on the student's layout


def test_context_parallel_refuses_what_it_cannot_do_by_name():
    """parallel.context_parallel_size: >= 1; with CP > 1 what would need the sequence other than as whole rows
    in megatron's chunks is refused, naming the key, and accepted at CP 1."""
    from megatron_gndpo.trainer.setup import sequence_multiple

    assert load_config(None, ["parallel.context_parallel_size=2"]).parallel.context_parallel_size == 2
    with pytest.raises(ValueError, match=r"parallel.context_parallel_size must be >= 1, got 0"):
        load_config(None, ["parallel.context_parallel_size=0"])
    cp2 = "parallel.context_parallel_size=2"
    for extra, what in ((["precision.local_attention=megatron"], "precision.local_attention='megatron'"),
                        (["teacher.precision.local_attention=megatron"], "teacher.precision.local_attention"),
                        (["trainer.pack_sequences=true"], "trainer.pack_sequences"),
                        (["data.images=process"], "data.images=process"),
                        (["teacher.parallel.tensor_model_parallel_size=2"], "teacher.parallel"),
                        (["teacher.quantize=fp8"], "teacher.quantize")):
        with pytest.raises(ValueError, match=f"parallel.context_parallel_size=2 .*{what}"):
            load_config(None, [cp2, *extra])
        load_config(None, extra)  # accepted without CP
    # every micro-batch splits into 2 CP equal chunks, each a multiple of 16 tokens per rank under FP8
    assert [sequence_multiple(fp8=False, context_parallel=cp) for cp in (1, 2, 4)] == [1, 4, 8]
    assert [sequence_multiple(fp8=True, context_parallel=cp) for cp in (1, 2, 4)] == [16, 32, 64]


def test_architectures_come_from_the_checkpoints(tmp_path):
    """A config names checkpoints; model / teacher.model default to what they were saved with, and
    a field the config states (the run's max_position_embeddings) wins."""
    import dataclasses

    from megatron_gndpo.checkpoint.dist_ckpt import write_meta
    from megatron_gndpo.config.schema import ModelConfig

    student = ModelConfig(vocab_size=1000, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                          num_key_value_heads=2, intermediate_size=160, max_position_embeddings=4096)
    teacher = dataclasses.replace(student, hidden_size=128, num_attention_heads=8, vocab_size=1024)
    for name, arch in (("student", student), ("teacher", teacher)):
        (tmp_path / name).mkdir()
        write_meta(tmp_path / name, arch, {"tp": 1, "pp": 1})
    cfg = load_config(None, [f"student_checkpoint={tmp_path / 'student'}", f"teacher.checkpoint={tmp_path / 'teacher'}",
                             "model.max_position_embeddings=1024"])
    assert cfg.model == dataclasses.replace(student, max_position_embeddings=1024)
    assert cfg.teacher.model == teacher
