import json
import os
import shutil
import subprocess
import sys

import pytest

from sida.offload.model_loader import ModelLoadError, check_model_dir, fingerprint, load_model


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_tiny_switch(tiny_dir):
    loaded = load_model(tiny_dir)
    assert loaded.config.num_experts == 4
    assert not loaded.model.training
    assert len(loaded.fingerprint) == 16


def test_fingerprint_is_stable_and_tracks_config(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path / "m")
    assert fingerprint(d) == fingerprint(tiny_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg["expert_capacity"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(d) != fingerprint(tiny_dir)


def test_fingerprint_tracks_retrained_weights_of_the_same_size(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy(tiny_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 1
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    assert (d / "model.safetensors").stat().st_size == (tiny_dir / "model.safetensors").stat().st_size
    assert fingerprint(d) != fingerprint(tiny_dir)


def test_fingerprint_of_large_files_covers_every_byte_and_is_cached(tiny_dir, tmp_path, monkeypatch):
    """A fine-tune that changes one middle tensor of a large file changes the fingerprint; the file's digest
    is computed once and then read from the cache (keyed by path, size and mtime)."""
    from safetensors.torch import load_file, save_file

    from sida.offload import model_loader

    cache = tmp_path / "fingerprints.json"
    d = copy(tiny_dir, tmp_path / "m")
    small = fingerprint(d, cache)
    monkeypatch.setattr(model_loader, "FINGERPRINT_WHOLE", 0)  # every file counts as large
    large = fingerprint(d, cache)
    assert large != small and len(json.loads(cache.read_text())) == 1
    reads = []
    monkeypatch.setattr(model_loader, "_file_digest", lambda path: reads.append(path) or "x")
    assert fingerprint(d, cache) == large and not reads  # from the cache
    tensors = load_file(d / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.undo()
    monkeypatch.setattr(model_loader, "FINGERPRINT_WHOLE", 0)
    assert fingerprint(d, cache) != large


def test_the_demo_models_fingerprint_is_the_one_its_predictor_was_trained_for(demo_dir):
    predictor = json.loads((demo_dir / "predictor" / "predictor.json").read_text())
    assert fingerprint(demo_dir) == predictor["model_fingerprint"]


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_dir(tmp_path / "absent")


def test_no_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        check_model_dir(tmp_path)


def test_corrupt_config(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model(d)


def test_unsupported_family(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path / "m")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load_model(d)


def test_pickle_checkpoints_are_refused(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle checkpoints are refused"):
        load_model(d)


def test_truncated_weights(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path / "m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(d)


def test_missing_tensors_fail_instead_of_random_init(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy(tiny_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    dropped = next(k for k in tensors if "expert_1" in k)
    del tensors[dropped]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="weights missing"):
        load_model(d)


def test_no_tokenizer(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(d)


@pytest.mark.slow  # a real `sida` process
def test_cli_reports_one_line_not_a_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "classify", "--model", str(tmp_path / "absent"), "hi"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


def test_fingerprint_cache_tells_apart_a_same_size_file_with_the_same_mtime(tiny_dir, tmp_path, monkeypatch):
    """A fine-tune copied over the weights with `cp -p` keeps path, size and mtime: the cached digest is keyed by
    inode and ctime too, so it is not reused for the new bytes."""
    from sida.offload import model_loader

    monkeypatch.setattr(model_loader, "FINGERPRINT_WHOLE", 0)  # every file goes through the cache
    cache = tmp_path / "fingerprints.json"
    d = copy(tiny_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    before = fingerprint(d, cache)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    tune = d / "tune.tmp"
    tune.write_bytes(bytes(data))
    os.utime(tune, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    tune.replace(weights)
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(d, cache) != before
