"""The composition root: the model, its offload engine and its hash function, assembled as the settings say."""

from __future__ import annotations

import dataclasses
import logging

import torch

from sida.offload import kv_cache
from sida.offload.contracts import HashFunction
from sida.offload.decode_batch import DecodeBatch
from sida.offload.device import resolve_device
from sida.offload.engine import OffloadEngine
from sida.offload.hash_table import rank_depth
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.predictor.artifact import find_predictor, load_predictor, predictor_folder
from sida.predictor.decode_ahead import DecodeAhead
from sida.predictor.decoder_guess import DecoderGuess
from sida.predictor.network import PredictorHash
from sida.predictor.oracle import OracleHash
from sida.server.schemas import MAX_TOKENS
from sida.server.settings import Settings

log = logging.getLogger("sida")


def build_runner(settings: Settings, hash_source: str = "auto") -> Runner:
    """`hash_source`: auto (the predictor shipped with the model, if any), none, or oracle (the router's own
    choices from a second, resident copy of the model)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    offload = settings.offload_config(device.type)
    predictor_path = None
    if hash_source == "auto" and offload.mode != "resident":
        predictor_path = settings.predictor or find_predictor(settings.model_dir)
    if offload.mode == "predicted" and predictor_path is None and hash_source != "oracle":
        raise ValueError(
            f"predicted mode needs hash tables: {settings.model_dir} ships no predictor (--predictor, --hash)"
        )
    if offload.mode == "exact" and predictor_path is None and not settings.mode_is_explicit and hash_source == "auto":
        log.warning("%s ships no predictor: serving in resident mode", settings.model_dir)
        offload = dataclasses.replace(offload, mode="resident")
    experts = "device" if offload.mode == "resident" else "host"  # offloaded: experts never reach the device whole
    loaded = load_model(settings.model_dir, settings.dtype, str(device), experts)
    k = rank_depth(offload.prefetch_k)
    hash_fn: HashFunction | None = None
    decoder_guess = None
    ahead = None  # the trained decode-step predictor, where the model ships one
    if hash_source == "oracle":
        hash_fn = OracleHash(load_model(settings.model_dir, settings.dtype, str(device)), k=k)
    elif predictor_path is not None:
        pred, _meta = load_predictor(predictor_path, loaded.fingerprint)
        hash_fn = PredictorHash(pred.to(device), k=k)
        decoder_guess = DecoderGuess.load(predictor_folder(predictor_path), loaded.fingerprint)
        ahead = DecodeAhead.load(predictor_folder(predictor_path), loaded.fingerprint)
    engine = OffloadEngine(loaded, offload, device)
    if ahead is not None and engine.context.lookahead is not None:
        engine.set_lookahead_scorer(ahead.to(device))
    if decoder_guess is not None and engine.cache is not None:
        engine.set_decoder_guess(decoder_guess)
    return Runner(loaded, str(device), settings.max_input_tokens, engine, hash_fn)


def attach_decode_batch(runner: Runner, settings: Settings) -> str:
    """Give a decoder-only model's runner its running decode batch (continuous batching) unless the settings or
    the model's cache rule it out; returns how completions are batched, "continuous" or "static"."""
    if not runner.causal or settings.batching == "static":
        return "static"
    reason = kv_cache.unsupported(runner.model.config)
    if reason is not None:
        log.warning("continuous batching is off for this model: %s; completions run in static batches", reason)
        return "static"
    decode = DecodeBatch(runner)
    full = settings.max_input_tokens + MAX_TOKENS  # the longest sequence a request can make
    decode.bind(settings.kv_cache_bytes or decode.kv_per_token * settings.max_batch_size * full)
    runner.decode_batch = decode
    log.info(
        "continuous batching: KV cache bound %.1f MiB (%d bytes per token)",
        decode.kv_bound / 2**20,
        decode.kv_per_token,
    )
    return "continuous"
