"""The composition root: the model, its offload engine and its hash function, assembled as the settings say."""

from __future__ import annotations

import dataclasses
import logging

import torch

from sida.offload.device import resolve_device
from sida.offload.engine import OffloadEngine
from sida.offload.hash_table import rank_depth
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.predictor.artifact import PredictorHash, find_predictor, load_predictor, predictor_folder
from sida.predictor.decoder import DecoderGuess
from sida.predictor.oracle import OracleHash
from sida.server.settings import Settings

log = logging.getLogger("sida")


def build_runner(settings: Settings, hash_source: str = "auto") -> Runner:
    """`hash_source`: auto (the predictor shipped with the model, if any), none, or oracle (the router's own
    choices from a second, resident copy of the model)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    offload = settings.offload_config()
    loaded = load_model(settings.model_dir, settings.dtype, str(device))
    k = rank_depth(offload.prefetch_k)
    hash_fn = decoder_guess = None
    if hash_source == "oracle":
        hash_fn = OracleHash(load_model(settings.model_dir, settings.dtype, str(device)), k=k)
    elif hash_source == "auto" and offload.mode != "resident":
        path = settings.predictor or find_predictor(loaded.path)
        if path is not None:
            pred, _meta = load_predictor(path, loaded.fingerprint)
            hash_fn = PredictorHash(pred.to(device), k=k)
            decoder_guess = DecoderGuess.load(predictor_folder(path), loaded.fingerprint)
    if offload.mode == "predicted" and hash_fn is None:
        raise ValueError(f"predicted mode needs hash tables: {loaded.path} ships no predictor (--predictor, --hash)")
    if offload.mode == "exact" and hash_fn is None and not settings.mode_is_explicit and hash_source == "auto":
        log.warning("%s ships no predictor: serving in resident mode", loaded.path)
        offload = dataclasses.replace(offload, mode="resident")
    engine = OffloadEngine(loaded, offload, device)
    if decoder_guess is not None and engine.cache is not None:
        engine.set_decoder_guess(decoder_guess)
    return Runner(loaded, str(device), settings.max_input_tokens, engine, hash_fn)
