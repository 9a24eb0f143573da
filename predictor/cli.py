"""`sida predictor trace|train|decoder|ahead|eval`: the commands that build and measure the shipped hash function,
decoder guess and decode-step predictor (wired in server/cli.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.offload.tasks import get_task
from sida.predictor.artifact import PredictorError, find_predictor, load_predictor, predictor_folder, save_predictor
from sida.predictor.corpora import read_c4_texts, read_inputs, read_wikitext_paragraphs
from sida.predictor.decode_ahead import DecodeAhead
from sida.predictor.decode_ahead import build as build_ahead
from sida.predictor.decoder_guess import (
    DecoderGuess,
    PrevTokenTable,
    decoder_hit_rates,
    decoder_routes,
    guess_hit_rates,
)
from sida.predictor.traces import (
    TraceSet,
    classification_batches,
    collect_traces,
    lm_batches,
    load_traces,
    save_traces,
    verify_alignment,
)
from sida.predictor.train import TrainConfig, hit_rates, train


def add_parser(sub) -> None:
    """Register `sida predictor trace|train|decoder|eval` on the `sida` parser."""
    p = sub.add_parser("predictor", help="router traces, hash-function training and evaluation")
    psub = p.add_subparsers(dest="predictor_command", required=True)

    t = psub.add_parser("trace", help="record encoder router traces over input files")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, action="append", help="tsv/jsonl/text file (repeatable)")
    t.add_argument("--limit", type=int, action="append", help="rows per --data file, in the same order")
    t.add_argument("--max-tokens", type=int, default=128)
    t.add_argument("--out", required=True, help="traces .safetensors file")

    t = psub.add_parser("train", help="train the hash function on traces")
    t.add_argument("--model", required=True)
    t.add_argument("--traces", required=True, action="append")
    t.add_argument("--out", required=True, help="folder for predictor.safetensors + predictor.json")
    t.add_argument("--epochs", type=int, default=TrainConfig.max_epochs)
    t.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    t.add_argument("--lr", type=float, default=TrainConfig.lr)
    t.add_argument("--checkpoint", help="resumable training state (torch.save of tensors, weights_only load)")

    t = psub.add_parser("decoder", help="fit the decoder guess (decoder experts by the previous token)")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help="the shared data folder (C4 sample, SST-2, MRPC, WikiText-2)")
    t.add_argument("--out", required=True, help="the predictor folder; writes decoder.safetensors there")
    t.add_argument("--docs", type=int, default=1000, help="C4 documents to fit on")

    t = psub.add_parser("ahead", help="train the decode-step predictor (each MoE layer's experts a layer ahead)")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help="the shared data folder (C4 sample and WikiText-2 valid)")
    t.add_argument("--out", required=True, help="the predictor folder; writes ahead.safetensors there")
    t.add_argument("--prompts", type=int, default=300, help="C4 documents, and WikiText paragraphs, continued")
    t.add_argument("--tokens", type=int, default=32, help="tokens generated from each")

    t = psub.add_parser("eval", help="hit rates and latency of a predictor on an input file")
    t.add_argument("--model", required=True)
    t.add_argument("--predictor", help="default: the one shipped in the model folder")
    t.add_argument("--data", required=True)
    t.add_argument("--limit", type=int)
    t.add_argument("--json", action="store_true")


def tracing_progress(desc: str = "tracing"):
    """A `progress(done, total)` callback drawing a bar on a terminal (nothing where stderr is not one: a CI log)."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="input", file=sys.stderr, disable=None)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def run(args) -> None:
    """Load the model once and run the chosen `sida predictor` command."""
    loaded = load_model(args.model)
    commands = {"trace": _trace, "train": _train, "decoder": _decoder, "ahead": _ahead, "eval": _eval}
    commands[args.predictor_command](args, loaded)


def _trace(args, loaded) -> None:
    """`sida predictor trace`: encoder router traces of the --data files, saved to --out."""
    limits = args.limit or []
    inputs = []
    for i, path in enumerate(args.data):
        inputs += read_inputs(path, limits[i] if i < len(limits) else None)
    traces = collect_traces(loaded, inputs, max_tokens=args.max_tokens, progress=tracing_progress())
    save_traces(traces, args.out)
    real = int(traces.attention_mask.sum())
    print(json.dumps({"rows": len(traces), "real_tokens": real, "layers": traces.layers, "out": args.out}))


def _train(args, loaded) -> None:
    """`sida predictor train`: the hash function on verified traces, saved as a predictor folder."""
    parts = [load_traces(p) for p in args.traces]
    for path, part in zip(args.traces, parts):
        agreement = verify_alignment(loaded, part)
        if agreement < 0.99:
            raise ValueError(f"{path}: only {agreement:.1%} of re-routed tokens match: traces misaligned or stale")
    traces = TraceSet.concat(parts)
    cfg = TrainConfig(hidden=args.hidden, max_epochs=args.epochs, lr=args.lr)
    emb = loaded.adapter.embeddings(loaded.model).weight.detach().float()
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    pred, report = train(
        traces, emb, loaded.adapter.num_experts(loaded.model), cfg, ckpt, log=lambda m: print(m, file=sys.stderr)
    )
    info = {"training_data": [str(p) for p in args.traces], "training": report}
    save_predictor(pred, args.out, loaded.fingerprint, info)
    print(json.dumps({"out": args.out, **{k: report["val"][k] for k in ("top1_hit_rate", "top3_hit_rate")}}))


def _decoder(args, loaded) -> None:
    """`sida predictor decoder`: fit the decoder guess on teacher-forced C4 continuations and the first decoder
    step of SST-2/MRPC train prompts; measure it on WikiText-2 valid continuations and SST-2 dev (never fitted on)."""
    data = Path(args.data)
    runner = Runner(loaded)
    c4 = [t for t in read_c4_texts(data / "c4_sample" / "c4_sample.jsonl", args.docs) if len(t.split()) > 60]
    prompts = [e.prompt for e in get_task("sst2").read(data / "sst2" / "train.tsv", 4000)]
    prompts += [e.prompt for e in get_task("mrpc").read(data / "mrpc" / "train.tsv", 2000)]
    table = PrevTokenTable(loaded.config.vocab_size, loaded.adapter.num_experts(loaded.model))
    table.fit(decoder_routes(loaded, lm_batches(runner, c4)))
    table.fit(decoder_routes(loaded, classification_batches(runner, prompts)))
    wiki = read_wikitext_paragraphs(data / "wikitext2" / "wiki.valid.tokens", 600)
    dev = [e.prompt for e in get_task("sst2").read(data / "sst2" / "dev.tsv")]
    info = {
        "fit": f"{len(c4)} C4 documents (teacher-forced continuations) + first decoder step of {len(prompts)} "
        "SST-2/MRPC train prompts; rows: decoder input token, first step by the encoder's first token",
        "wikitext_valid": decoder_hit_rates(table, decoder_routes(loaded, lm_batches(runner, wiki))),
        "sst2_dev_first_step": decoder_hit_rates(table, decoder_routes(loaded, classification_batches(runner, dev))),
    }
    DecoderGuess.from_table(table).save(args.out, loaded.fingerprint, info)
    print(json.dumps({"out": str(Path(args.out) / DecoderGuess.FILE), **info}))


def _ahead(args, loaded) -> None:
    """`sida predictor ahead`: fit and measure the decode-step predictor (`decode_ahead.build`), save it."""
    net, info = build_ahead(loaded, Path(args.data), args.prompts, args.tokens)
    net.save(args.out, loaded.fingerprint, info)
    print(json.dumps({"out": str(Path(args.out) / DecodeAhead.FILE), **info}))


def _eval(args, loaded) -> None:
    """`sida predictor eval`: hit rates and latency of a predictor (and its decoder guess) on --data."""
    path = args.predictor or find_predictor(loaded.path)
    if path is None:
        raise PredictorError(f"{loaded.path} ships no predictor; pass --predictor")
    pred, _meta = load_predictor(path, loaded.fingerprint)
    inputs = read_inputs(args.data, args.limit)
    traces = collect_traces(loaded, inputs, progress=tracing_progress())
    rates = hit_rates(pred, traces)
    summary = {
        "data": str(args.data),
        "examples": len(inputs),
        "real_tokens": rates["tokens"],
        "top1_hit_rate": round(rates["top1_hit_rate"], 6),
        "top3_hit_rate": round(rates["top3_hit_rate"], 6),
        "per_layer": {k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in rates["per_layer"].items()},
        "decoder": _decoder_eval(loaded, path, inputs),
        **_latency(loaded, pred, inputs[:32]),
    }
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=1))


def _decoder_eval(loaded, path, inputs: list[str]) -> dict:
    """Decoder layers: hit rates of the shipped decoder guess at the first decoder step of these inputs (what
    classification runs); the router always routes them, the guess only prefetches."""
    folder = predictor_folder(path)
    guess = DecoderGuess.load(folder, loaded.fingerprint)
    if guess is None:
        return {"table": None, "note": "no decoder.safetensors: decoder experts are loaded when the router asks"}
    routes = decoder_routes(loaded, classification_batches(Runner(loaded), inputs))
    return {"table": str(folder / DecoderGuess.FILE), "first_step": guess_hit_rates(guess, routes)}


@torch.inference_mode()
def _latency(loaded, pred, batch: list[str], rounds: int = 15, block: int = 4) -> dict:
    """Median wall time of one predictor forward vs one model forward (encoder + first decoder step), each in
    its steady state: blocks of `block` + 1 calls of one then of the other, the first call of a block untimed
    (it pays for the other's caches). Alternating blocks makes a busy neighbour on a shared machine slow both
    rather than one; the strictly alternating time of the predictor is reported beside it."""
    enc = loaded.tokenizer(batch, padding=True, return_tensors="pt")
    start = loaded.decoder_start_ids(len(batch))

    def predictor():
        return pred(enc["input_ids"], enc["attention_mask"])

    def model():
        return loaded.model(**enc, decoder_input_ids=start)

    times: dict = {predictor: [], model: []}
    after_model = []
    for _ in range(rounds):
        for fn in (predictor, model):
            for i in range(block + 1):
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
                if i > 0:
                    times[fn].append(elapsed)
                elif fn is predictor:
                    after_model.append(elapsed)
    p, m, cold = (sorted(t)[len(t) // 2] for t in (times[predictor], times[model], after_model[1:]))
    return {
        "batch": len(batch),
        "predictor_ms": round(p * 1e3, 3),
        "model_ms": round(m * 1e3, 3),
        "predictor_over_model": round(p / m, 4),
        "predictor_ms_right_after_model": round(cold * 1e3, 3),
    }
