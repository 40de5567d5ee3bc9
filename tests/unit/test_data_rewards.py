"""Prompt parquet validation, prompt order, rewards, the Geometry3K data tool, example configs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_gndpo.config import load_config
from megatron_gndpo.data.prompts import PromptDataset, PromptOrder, read_prompt_rows, verl_row, write_prompt_parquet
from megatron_gndpo.data.tokenizer import load_tokenizer
from megatron_gndpo.rewards import get_reward
from tests.trainer_setup import REPO, TOKENIZER


def _rows(n=3):
    return [verl_row([{"role": "user", "content": f"{i}+1="}], str(i + 1), data_source="t") for i in range(n)]


def test_malformed_rows_name_file_row_and_column(tmp_path):
    rows = _rows()
    rows[2]["prompt"] = [{"role": "user"}]  # no content
    write_prompt_parquet(str(tmp_path / "a.parquet"), rows)
    with pytest.raises(ValueError, match=r"a\.parquet: row 2, column 'prompt'"):
        read_prompt_rows([str(tmp_path / "a.parquet")])
    rows = _rows()
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "reward_model"} for r in rows]),
                   str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match="missing column.*reward_model"):
        read_prompt_rows([str(tmp_path / "b.parquet")])
    rows = _rows()
    rows[1]["reward_model"] = {"style": "rule", "ground_truth": None}
    write_prompt_parquet(str(tmp_path / "c.parquet"), rows)
    with pytest.raises(ValueError, match="row 1, column 'reward_model'"):
        read_prompt_rows([str(tmp_path / "c.parquet")])
    rows = _rows()
    rows[0]["images"] = [{"bytes": b"x"}]
    write_prompt_parquet(str(tmp_path / "d.parquet"), rows)
    with pytest.raises(ValueError, match="row 0, column 'images'.*text-only"):
        read_prompt_rows([str(tmp_path / "d.parquet")])
    assert len(read_prompt_rows([str(tmp_path / "d.parquet")], images="ignore")) == 3


def test_empty_dataset_and_long_prompt_are_errors(tmp_path):
    pq.write_table(pa.Table.from_pylist(_rows())[:0], str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="has no rows"):
        read_prompt_rows([str(tmp_path / "empty.parquet")])
    write_prompt_parquet(str(tmp_path / "ok.parquet"), _rows())
    with pytest.raises(ValueError, match="row 0: the prompt is 4 tokens, longer than data.max_prompt_length"):
        PromptDataset([str(tmp_path / "ok.parquet")], load_tokenizer(TOKENIZER), max_prompt_length=3)


def test_prompt_order_is_seeded_and_resumable():
    a = PromptOrder(10, seed=3, shuffle=True)
    first = a.take(7) + a.take(7)
    assert sorted(first[:10]) == list(range(10))  # one full epoch before any repeat
    b = PromptOrder(10, seed=3, shuffle=True)
    b.take(7)
    c = PromptOrder(10, seed=3, shuffle=True)
    c.load_state_dict(b.state_dict())
    assert c.take(7) == first[7:]
    with pytest.raises(ValueError, match="dataset of 10 rows, this one has 12"):
        PromptOrder(12, seed=3, shuffle=True).load_state_dict(b.state_dict())


def test_rewards():
    assert get_reward("exact_match")(" 42 ", "42") == {"reward": 1.0, "acc": 1.0, "format": 1.0}
    assert get_reward("exact_match")("41", "42")["reward"] == 0.0
    geo = get_reward("geo3k")
    assert geo("<think>a right angle</think> so \\boxed{\\frac{1}{2}}", "0.5") == pytest.approx(
        {"reward": 1.0, "acc": 1.0, "format": 1.0})
    assert geo("the answer is \\boxed{3}", "3") == pytest.approx({"reward": 0.9, "acc": 1.0, "format": 0.0})
    assert geo("<think>x</think> \\boxed{4}", "3") == pytest.approx({"reward": 0.1, "acc": 0.0, "format": 1.0})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")


def test_geo3k_tool_converts_a_local_copy(tmp_path):
    from tools.data import geo3k

    src = tmp_path / "geometry3k"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist([{"problem": "<image>Find x.", "answer": "3", "images": [{"bytes": b"png"}]}]),
                   str(src / "train-00000.parquet"))
    pq.write_table(pa.Table.from_pylist([{"problem": "Find y.", "answer": "4", "images": []}]),
                   str(src / "test-00000.parquet"))
    geo3k.main(["--src", str(src), "--out", str(tmp_path / "out")])
    rows = read_prompt_rows([str(tmp_path / "out" / "train.parquet")], images="ignore")
    assert rows[0].ground_truth == "3" and rows[0].messages[0]["content"].startswith("<image>Find x.")
    assert "\\boxed{}" in rows[0].messages[0]["content"]
    pq.write_table(pa.Table.from_pylist([{"problem": None, "answer": "4"}]), str(src / "test-00000.parquet"))
    with pytest.raises(ValueError, match="test row 0: column 'problem'"):
        geo3k.main(["--src", str(src), "--out", str(tmp_path / "out2")])


@pytest.mark.parametrize("name", ["demo.yaml", "geo3k_gndpo.yaml", "geo3k_opd.yaml", "geo3k_gndpo_internvl.yaml",
                                  "geo3k_gndpo_qwen25vl.yaml"])
def test_example_configs_load(name):
    cfg = load_config(REPO / "examples" / "configs" / name)
    assert cfg.algorithm.estimator in ("gndpo", "opd")
    assert Path(REPO / cfg.data.tokenizer).exists() or name != "demo.yaml"
