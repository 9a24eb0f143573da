"""Random-weight replicas of OLMoE and Qwen3-MoE: shrunk folders load in transformers with every key matched, the
experts loaded are the per-expert tensors on disk, the shard index agrees with the files, and the full-size shapes
add up to the published parameter counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.replicas import SHAPES, STAMP, main, replica_config, tensor_specs, write_replica
from sida.offload.checkpoint import Checkpoint, read_header

SHARD = 10**6  # bytes: the shrunk models (2.4 MB) then span several shards and need the index
PUBLISHED_PARAMS = {"olmoe-1b-7b": 6.92e9, "qwen3-30b-a3b": 30.5e9}  # the model cards' totals


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    folders = {s: root / s for s in SHAPES}
    for shape, folder in folders.items():
        write_replica(shape, folder, shrink=True, max_shard_bytes=SHARD, log=lambda m: None)
    return folders


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, output_loading_info=True)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_loads_with_every_key_matched_keeps_dtype_and_runs(replicas, shape):
    model, info = load(replicas[shape])
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert model.config.model_type == SHAPES[shape].config_cls.model_type
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[5, 17, 8005, 1]])  # 8005: the demo tokenizer's highest id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 8192) and torch.isfinite(logits).all()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_loaded_experts_are_the_per_expert_tensors_on_disk(replicas, shape):
    model, _ = load(replicas[shape])
    disk = Checkpoint(replicas[shape])
    for layer, block in enumerate(model.model.layers):
        p = f"model.layers.{layer}.mlp."
        assert torch.equal(block.mlp.gate.weight, disk.read(p + "gate.weight"))
        for e in range(model.config.num_experts):
            gate, up, down = (disk.read(f"{p}experts.{e}.{n}_proj.weight") for n in ("gate", "up", "down"))
            assert torch.equal(block.mlp.experts.gate_up_proj[e], torch.cat([gate, up]))  # [2I, H]
            assert torch.equal(block.mlp.experts.down_proj[e], down)  # [H, I]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_names_and_shapes_are_what_save_pretrained_writes(replicas, shape, tmp_path):
    cfg = replica_config(shape, shrink=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    theirs = {n: i.shape for n, i in read_header(tmp_path / "model.safetensors")[0].items()}
    ours = {n: i.shape for n, i in Checkpoint(replicas[shape]).tensors.items()}
    assert ours == theirs


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shard_index_agrees_with_the_files(replicas, shape):
    folder = replicas[shape]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    found, total = {}, 0
    for name in files:
        tensors = read_header(folder / name)[0]
        assert sum(i.nbytes for i in tensors.values()) <= SHARD or len(tensors) == 1
        found.update({t: name for t in tensors})
        total += sum(i.nbytes for i in tensors.values())
    assert found == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    stamp = json.loads((folder / STAMP).read_text())
    assert stamp["expert_bytes"] + stamp["dense_bytes"] == total


def test_config_carries_the_demo_tokenizer_ids_and_the_folder_its_files(replicas):
    folder = replicas["qwen3-30b-a3b"]
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["pad_token_id"], cfg["eos_token_id"], cfg["bos_token_id"], cfg["dtype"]) == (0, 1, None, "bfloat16")
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert cfg["head_dim"] == 32 and cfg["norm_topk_prob"] is True


def test_every_id_of_the_vocabulary_decodes_to_text(replicas):
    """A random model's greedy tokens lie anywhere in the vocabulary: each must decode to something, so that two
    runs' completions compare token for token; the demo tokenizer's own ids keep their meaning."""
    from transformers import AutoTokenizer

    folder = replicas["olmoe-1b-7b"]
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == vocab
    assert tok.decode([vocab - 1]) == f"<r{vocab - 1}>"
    assert tok("positive", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("positive")]


def test_values_are_seeded_per_tensor_and_a_rerun_keeps_the_folder(tmp_path, capsys):
    main(["olmoe-1b-7b", "--shrink", "--out", str(tmp_path / "a")])
    assert "olmoe-1b-7b: 2 of 2 layers, bfloat16" in capsys.readouterr().out
    mtime = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    logged = []
    write_replica("olmoe-1b-7b", tmp_path / "a", shrink=True, max_shard_bytes=2 * 10**9, log=logged.append)
    assert logged == [f"{tmp_path / 'a'}: up to date"]
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == mtime
    # the same seed sharded otherwise gives the same values; another seed (a rewrite) others
    write_replica("olmoe-1b-7b", tmp_path / "b", shrink=True, max_shard_bytes=SHARD, log=lambda m: None)
    write_replica("olmoe-1b-7b", tmp_path / "c", shrink=True, seed=1, log=lambda m: None)
    a, b, c = (Checkpoint(tmp_path / n) for n in "abc")
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert torch.equal(a.read(name), b.read(name)) and not torch.equal(a.read(name), c.read(name))
    write_replica("olmoe-1b-7b", tmp_path / "a", shrink=True, seed=1, log=logged.append)
    assert logged[-1] != f"{tmp_path / 'a'}: up to date" and torch.equal(
        Checkpoint(tmp_path / "a").read(name), c.read(name)
    )
    weight = b.read("lm_head.weight").float()
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(b.read("model.layers.0.self_attn.q_norm.weight"), torch.ones(64, dtype=torch.bfloat16))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_full_size_shapes_match_the_published_parameter_counts(shape):
    full = SHAPES[shape].values["num_hidden_layers"]
    cfg = replica_config(shape, layers=full)
    params = sum(math.prod(s.shape) for s in tensor_specs(shape, cfg))
    assert params == pytest.approx(PUBLISHED_PARAMS[shape], rel=0.01)
    two = replica_config(shape, layers=2)  # the model transformers builds from the config has these very shapes
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(two)
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s.shape) for s in tensor_specs(shape, two))
    assert cfg.vocab_size == SHAPES[shape].values["vocab_size"]  # the real embedding size, not the tokenizer's


def test_layer_count_out_of_range():
    with pytest.raises(ValueError, match="olmoe-1b-7b has 16 layers; --layers 17 is out of range"):
        replica_config("olmoe-1b-7b", layers=17)
