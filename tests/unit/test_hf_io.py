"""The streaming safetensors reader / shard writer of the converter (single process, no megatron)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_gndpo.checkpoint.hf_io import HFCheckpointReader, HFShardWriter, plan_shards


def test_plan_shards_packs_in_order_and_isolates_large_tensors():
    sizes = [("a", 40), ("b", 40), ("c", 40), ("big", 500), ("d", 10), ("e", 90), ("f", 1)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d", "e"], ["f"]]
    assert plan_shards([("x", 5)], 1) == [["x"]]


def test_shard_writer_writes_each_shard_when_complete(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}  # 16 bytes each
    writer = HFShardWriter(tmp_path, [(k, 16) for k in tensors], max_shard_bytes=32)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == []
    writer.add("t0", tensors["t0"])
    assert not list(tmp_path.glob("*.safetensors"))
    writer.add("t1", tensors["t1"])
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model-00001-of-00003.safetensors"]
    with pytest.raises(KeyError, match="'t9' was not planned"):
        writer.add("t9", tensors["t0"])
    with pytest.raises(ValueError, match="'t2' has 8 bytes, 16 were planned"):
        writer.add("t2", torch.zeros(2))
    writer.add("t2", tensors["t2"])
    with pytest.raises(RuntimeError, match="2 planned tensors were never written"):
        writer.finish()
    writer.add("t4", tensors["t4"])
    writer.add("t3", tensors["t3"])
    summary = writer.finish()
    assert summary == {"tensors": 5, "shards": 3, "bytes": 80}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for key, name in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / name))[key], tensors[key])


def test_reader_is_lazy_and_checks_the_index(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "s1.safetensors"))
    save_file({"c": torch.arange(4.0)}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with HFCheckpointReader(tmp_path) as reader:
        assert sorted(reader.keys()) == ["a", "b", "c"]
        assert torch.equal(reader.get("c"), torch.arange(4.0))
        with pytest.raises(KeyError, match="has no tensor 'z'"):
            reader.get("z")
    index["weight_map"]["c"] = "s1.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match="lists tensor 'c' in s1.safetensors, which does not contain it"):
        HFCheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        HFCheckpointReader(tmp_path)
