"""Teacher / student vocabulary: one tokenizer (by content, not by embedding size), embeddings that hold
it, and the shared vocabulary size every vocab-parallel op masks at."""

from __future__ import annotations

import json

import pytest

from megatron_gndpo.checkpoint.dist_ckpt import LATEST_FILE, META_FILE, TOKENIZER_DIR
from megatron_gndpo.config import ModelConfig, RunConfig, TeacherConfig
from megatron_gndpo.config.schema import check_same_vocabulary
from megatron_gndpo.data.tokenizer import check_checkpoint_tokenizers, load_tokenizer, tokenizer_fingerprint
from tests.trainer_setup import TOKENIZER


def _tokenizer(extra=()):
    tok = load_tokenizer(TOKENIZER)
    tok.add_tokens(list(extra))
    return tok


def _checkpoint(tmp_path, name, tokenizer):
    """A directory laid out like a checkpoint (its metadata file, no weights), with ``tokenizer`` under tokenizer/."""
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / META_FILE).write_text("{}")
    tokenizer.save_pretrained(str(tmp_path / name / TOKENIZER_DIR))
    return str(tmp_path / name)


def test_fingerprint_is_the_vocabulary_and_special_tokens_not_the_files(tmp_path):
    tok = _tokenizer(["<a>", "<b>"])
    reloaded = load_tokenizer(_checkpoint(tmp_path, "ckpt", tok) + "/tokenizer")
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tok)
    # another context length in tokenizer_config.json (Qwen2.5-7B vs -1.5B) is the same tokenizer
    config = tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 32768}))
    assert tokenizer_fingerprint(load_tokenizer(str(config.parent))) == tokenizer_fingerprint(tok)
    # same size, same tokens, two ids swapped: another tokenizer
    assert tokenizer_fingerprint(_tokenizer(["<b>", "<a>"])) != tokenizer_fingerprint(tok)
    # same vocabulary, another token in the eos role
    other_eos = _tokenizer(["<a>", "<b>"])
    other_eos.eos_token = "<b>"
    assert tokenizer_fingerprint(other_eos) != tokenizer_fingerprint(tok)


def test_checkpoint_tokenizers_must_be_the_data_tokenizer(tmp_path):
    tok = _tokenizer(["<a>", "<b>"])
    same = _checkpoint(tmp_path, "student", tok)
    check_checkpoint_tokenizers(tok, TOKENIZER, {"student_checkpoint": same, "teacher.checkpoint": None})

    swapped = _checkpoint(tmp_path, "teacher", _tokenizer(["<b>", "<a>"]))
    with pytest.raises(ValueError) as err:
        check_checkpoint_tokenizers(tok, TOKENIZER, {"student_checkpoint": same, "teacher.checkpoint": swapped})
    message = str(err.value)
    assert f"teacher.checkpoint ({swapped}/tokenizer, 17 tokens)" in message
    assert f"data.tokenizer ({TOKENIZER}, 17 tokens) in its vocabulary:" in message

    other_eos = _tokenizer(["<a>", "<b>"])
    other_eos.eos_token = "<b>"
    with pytest.raises(ValueError, match="in its special tokens:"):
        check_checkpoint_tokenizers(tok, TOKENIZER, {"student_checkpoint": _checkpoint(tmp_path, "s2", other_eos)})

    # a checkpoint root (RUN/checkpoints): the step its `latest` names, the one the weights load from
    _checkpoint(tmp_path / "run", "step_00000002", _tokenizer(["<b>", "<a>"]))
    (tmp_path / "run" / LATEST_FILE).write_text("step_00000002")
    with pytest.raises(ValueError, match="run/step_00000002/tokenizer, 17 tokens"):
        check_checkpoint_tokenizers(tok, TOKENIZER, {"student_checkpoint": str(tmp_path / "run")})


def test_checkpoint_without_its_tokenizer_is_refused(tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / META_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"student_checkpoint=.*bare has no tokenizer/ folder"):
        check_checkpoint_tokenizers(_tokenizer(), TOKENIZER, {"student_checkpoint": str(tmp_path / "bare")})


def test_shared_vocabulary_of_qwen_7b_and_1_5b():
    """One 151665-token tokenizer, embeddings of 151936 (1.5B) and 152064 (7B) rows: accepted, in either
    role, and the log-ratio is over the 151936 ids both models have."""
    small, large = ModelConfig(vocab_size=151936), ModelConfig(vocab_size=152064)
    assert check_same_vocabulary(151665, small, large) == 151936
    assert check_same_vocabulary(151665, large, small) == 151936
    # different sizes and paddings no longer stop the config (the tokenizer check needs its files)
    cfg = RunConfig(model=ModelConfig(vocab_size=1000),
                    teacher=TeacherConfig(model=ModelConfig(vocab_size=1008, make_vocab_size_divisible_by=8)))
    assert check_same_vocabulary(1000, cfg.model, cfg.teacher.model) == 1000


def test_tokenizer_larger_than_an_embedding_is_refused():
    with pytest.raises(ValueError, match="the tokenizer has 1001 tokens but model.vocab_size is 1000"):
        check_same_vocabulary(1001, ModelConfig(vocab_size=1000), ModelConfig(vocab_size=1024))
    with pytest.raises(ValueError, match="the tokenizer has 1001 tokens but teacher.model.vocab_size is 1000"):
        check_same_vocabulary(1001, ModelConfig(vocab_size=1024), ModelConfig(vocab_size=1000))
