"""The predictor artifact: `predictor.safetensors` (weights) + `predictor.json` (architecture, the model's
fingerprint, training data and figures). A predictor built for another model is refused, clearly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sida.predictor.network import HashPredictor, PredictorArch


class PredictorError(ValueError):
    """A predictor artifact that cannot be used (missing files, built for another model)."""


def save_predictor(pred: HashPredictor, out_dir: str | Path, fingerprint: str, info: dict) -> Path:
    """Write `predictor.safetensors` and `predictor.json` (architecture, model fingerprint, `info`) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in pred.state_dict().items()}
    save_file(state, str(out_dir / "predictor.safetensors"))
    meta = {"arch": pred.arch.to_dict(), "model_fingerprint": fingerprint, **info}
    (out_dir / "predictor.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir / "predictor.safetensors"


def save_bound(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file of a model's predictor folder, bound to the model by its fingerprint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"fingerprint": fingerprint, **metadata})


def load_bound(path: Path, fingerprint: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a file `save_bound` wrote, or None where there is none; PredictorError where it is
    unreadable or was built for another model. `what` names it in the errors."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PredictorError(f"{path} is not a readable {what} ({e})") from None
    if meta.get("fingerprint") != fingerprint:
        raise PredictorError(
            f"{path}: {what} was built for model {meta.get('fingerprint')}, this model is {fingerprint}"
        )
    return tensors, meta


def find_predictor(model_dir: str | Path) -> Path | None:
    """The predictor shipped with a model: in its folder, or in a `predictor/` folder inside it."""
    for candidate in (Path(model_dir), Path(model_dir) / "predictor"):
        if (candidate / "predictor.safetensors").is_file():
            return candidate
    return None


def predictor_folder(path: str | Path) -> Path:
    """The folder of a predictor given as its folder or as its `predictor.safetensors` file."""
    path = Path(path)
    return path.parent if path.suffix == ".safetensors" else path


def load_predictor(path: str | Path, fingerprint: str) -> tuple[HashPredictor, dict]:
    """(predictor in eval mode, its metadata) from a folder or its weights file; refused for another model."""
    folder = predictor_folder(path)
    meta_path, weights = folder / "predictor.json", folder / "predictor.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise PredictorError(f"{folder}: expected predictor.json and predictor.safetensors")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PredictorError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), dict):
        raise PredictorError(f"{meta_path} has no 'arch' object")
    if meta.get("model_fingerprint") != fingerprint:
        raise PredictorError(
            f"{meta_path}: predictor was trained for model {meta.get('model_fingerprint')}, "
            f"this model's fingerprint is {fingerprint}"
        )
    try:
        pred = HashPredictor(PredictorArch.from_dict(meta["arch"]))
    except (TypeError, KeyError, ValueError) as e:
        raise PredictorError(f"{meta_path}: 'arch' is not a predictor architecture ({e})") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise PredictorError(f"{weights} is not a readable safetensors file ({e})") from None
    try:
        pred.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PredictorError(f"{weights} does not match the architecture in {meta_path.name}: {first}") from None
    return pred.eval(), meta
