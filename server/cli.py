"""`sida`: the command line. Settings are resolved here, once, and passed inward as plain values."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import signal
import sys
import tempfile
import time
from importlib.metadata import version

import uvicorn
import yaml

from sida.offload.memory import peak_rss_bytes
from sida.offload.model_loader import ModelLoadError, load_model
from sida.offload.runner import Runner
from sida.offload.task_accuracy import evaluate, write_predictions
from sida.offload.tasks import TASKS, get_task
from sida.predictor import cli as predictor_cli
from sida.server.app import app_from_settings
from sida.server.composition import build_runner
from sida.server.head_timeout import head_timeout_protocol
from sida.server.middleware import UNMATCHED
from sida.server.settings import Settings, SettingsError, load_settings
from sida.server.state import State

log = logging.getLogger("sida")

EXIT_WORKER_FAILED = 1  # `sida serve` after a worker thread stopped: a supervisor should restart it


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (override configs/*.yaml and SIDA_* env)")
    g.add_argument("--config", help="YAML settings file (or SIDA_CONFIG)")
    g.add_argument("--model", dest="model_dir", help="local Hugging Face model folder")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights' dtype: auto (the default) keeps a bfloat16 checkpoint in bfloat16, anything else in float32",
    )
    g.add_argument("--torch-threads", type=int, help="torch intra-op threads")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--max-input-tokens", type=int)
    g = p.add_argument_group("offload")
    g.add_argument("--mode", choices=["resident", "exact", "predicted"])
    g.add_argument("--budget-experts", type=int, help="device slots for all MoE layers together")
    g.add_argument("--budget-bytes", type=int, help="the same budget in bytes")
    g.add_argument(
        "--budget",
        choices=["auto", "half"],
        help="without --budget-experts/--budget-bytes: auto (what the device has free after the dense weights and "
        "the activations of the largest batch; the default on CUDA) or half of all experts (the default on CPU)",
    )
    g.add_argument("--device-memory-limit", type=int, help="bytes sida may place on the device (default: all it has)")
    g.add_argument("--policy", choices=["fifo", "lru", "lfu", "layered"])
    g.add_argument("--tier", choices=["ram", "disk"])
    g.add_argument("--prefetch-k", type=int)
    g.add_argument("--expert-dir", help="tier disk: folder for the expert file")
    g.add_argument(
        "--disk-io",
        choices=["direct", "dontneed"],
        help="tier disk: O_DIRECT reads (default), or reads through the page cache dropped after each read",
    )
    g.add_argument("--predictor", help="predictor folder (default: the one shipped with the model)")
    g.add_argument(
        "--hash",
        choices=["auto", "none", "oracle"],
        default="auto",
        help="hash tables: auto (the predictor, if any), none, or oracle (the router's own choices from a "
        "resident copy: an upper bound for tests and benchmarks)",
    )


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-style API, /metrics)")
    _common(p)
    g = p.add_argument_group("serving")
    g.add_argument("--host")
    g.add_argument("--port", type=int)
    g.add_argument("--served-model-name")
    g.add_argument("--max-batch-size", type=int)
    g.add_argument("--max-batch-tokens", type=int)
    g.add_argument("--max-batch-wait-ms", type=float)
    g.add_argument("--max-queue", type=int)
    g.add_argument(
        "--batching",
        choices=["continuous", "static"],
        help="a decoder-only model's completions: one running decode batch sequences join and leave step by step "
        "(continuous, the default), or whole batches run to their end (static)",
    )
    g.add_argument(
        "--kv-cache-bytes",
        type=int,
        help="continuous batching: bytes the running sequences' KV cache may reach (default: max-batch-size "
        "sequences of max-input-tokens + 512 tokens)",
    )
    g.add_argument("--request-timeout-s", type=float)
    g.add_argument("--step-timeout-s", type=float, help="an inference step longer than this turns readiness 503")
    g.add_argument("--max-body-bytes", type=int)
    g.add_argument("--body-timeout-s", type=float)
    g.add_argument("--api-key")
    g.add_argument("--shadow-sample-rate", type=float)
    g.add_argument(
        "--hash-torch-threads",
        type=int,
        help="torch threads of the batch worker, which builds the hash tables (default 1 on CPU)",
    )
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group("scale-out (Ray Serve; pip install 'sida[ray]'; docs/scale-out.md)")
    g.add_argument("--replicas", type=int, help="serve N replicas behind Ray Serve's proxy (default: one process)")
    g.add_argument("--ray-address", help="with --replicas: the Ray cluster to join (default: RAY_ADDRESS or a new one)")


def build_parser() -> argparse.ArgumentParser:
    """The `sida` command and its subcommands; every settings flag is named after its setting."""
    parser = argparse.ArgumentParser(prog="sida", description="SiDA-MoE serving daemon and tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('sida')}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="label sentences (SST-2 sentiment on the demo model)")
    _common(p)
    p.add_argument("text", nargs="+")
    p.add_argument("--task", default="sst2", choices=[n for n, t in TASKS.items() if len(t.fields) == 1])
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("complete", help="continue prompts with the model's decoder")
    _common(p)
    p.add_argument("text", nargs="+")
    p.add_argument("--max-tokens", type=int, dest="max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("eval", help="task accuracy over a labelled data file")
    _common(p)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="e.g. ../shared/data/sst2/dev.tsv")
    p.add_argument("--limit", type=int, help="first N examples only")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.add_argument("--out", help="write {index, prediction} JSON lines here")
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=0,
        help="a decoder-only model: then continue each prompt by N greedy tokens and report the decode-step guess's "
        "recall (`decode_recall`)",
    )

    _add_serve(sub)

    p = sub.add_parser("config", help="print the resolved settings")
    _common(p)

    predictor_cli.add_parser(sub)

    # Its options (and --help) are the builder's own: `main` passes the rest of the command line to it.
    sub.add_parser(
        "build-demo", add_help=False, help="train the embedded demo model (about 75 min on 2 cores), or its card"
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Flags are named after settings; a flag not given (None) leaves the YAML/env/default value."""
    return load_settings(args.config, **{k: getattr(args, k, None) for k in Settings.model_fields})


def check_expert_dir(settings: Settings) -> None:
    """Tier 'disk' writes its expert file into `expert_dir`: a folder that cannot take a file is refused before
    the model loads, naming the setting."""
    folder = settings.expert_dir
    if settings.tier != "disk" or folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SettingsError(f"expert_dir: {folder} is not a writable folder ({e.strerror})") from None


def cmd_classify(args, settings: Settings) -> None:
    runner = build_runner(settings, args.hash)
    for text, c in zip(args.text, runner.classify(args.text, args.task)):
        if args.json:
            print(json.dumps({"text": text, "label": c.label, "probs": c.probs}))
        else:
            print(f"{c.label:<9} {c.probs[c.label]:.3f}  {text}")


def cmd_complete(args, settings: Settings) -> None:
    runner = build_runner(settings, args.hash)
    max_new = args.max_new_tokens or settings.max_new_tokens
    for text, c in zip(args.text, runner.complete(args.text, max_new, args.temperature, args.top_p, args.seed)):
        if args.json:
            print(json.dumps({"prompt": text, "completion": c.text, "finish_reason": c.finish_reason}))
        else:
            print(f"{text} → {c.text}")


def cmd_eval(args, settings: Settings) -> None:
    runner = build_runner(settings, args.hash)
    result = evaluate(runner, args.task, args.data, args.limit, settings.batch_size)
    summary = {"model": str(settings.model_dir), "fingerprint": runner.loaded.fingerprint, **result.summary()}
    summary.update(runner.engine.summary())
    summary["peak_rss_bytes"] = peak_rss_bytes()  # loading and evaluating, before any fidelity run below
    if settings.mode == "predicted":  # fidelity: the same data through the untouched model
        plain = Runner(load_model(settings.model_dir, settings.dtype, str(runner.device)), str(runner.device))
        base = evaluate(plain, args.task, args.data, args.limit, settings.batch_size)
        summary["resident_accuracy"] = round(base.accuracy, 6)
        summary["fidelity"] = round(result.accuracy / base.accuracy, 6) if base.accuracy else None
        same = sum(a == b for a, b in zip(result.predictions, base.predictions))
        summary["prediction_agreement"] = round(same / result.examples, 6)
    if args.decode_tokens and runner.causal:  # decode steps, counted apart from the classification's figures
        runner.engine.reset_stats()
        prompts = [e.prompt for e in get_task(args.task).read(args.data, args.limit)]
        for i in range(0, len(prompts), settings.batch_size):
            runner.complete(prompts[i : i + settings.batch_size], args.decode_tokens, ignore_eos=True)
        summary["decode_recall"] = runner.engine.summary().get("decode_recall")
    if args.out:
        write_predictions(result, args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{result.task}: accuracy {result.accuracy:.4f} on {result.examples} examples ({result.seconds:.1f}s)")


class GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT: readiness and new `/v1/` calls answer 503 at once while every accepted request is answered
    (the listener stays open, so that a load balancer sees the 503), then uvicorn's shutdown and the lifespan's
    drain; exit 0. A second signal skips the wait. A failed worker also ends the serving loop.

    Plain uvicorn closes its listener at once and re-raises the signal after its shutdown, so the process ends
    with -15; a daemon under systemd or Kubernetes should report a clean stop instead.
    """

    def __init__(self, config: uvicorn.Config, state: State, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_deadline is not None:
            return super().handle_exit(sig, frame)
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        self.state.begin_drain(self.drain_deadline)
        pending = self.state.pipeline.unanswered if self.state.pipeline is not None else 0
        log.info("draining: answering %d accepted requests, then exiting", pending)

    async def on_tick(self, counter: int) -> bool:
        """Whether the serving loop ends now: a signal's drain is done (or out of time), or a worker failed."""
        if await super().on_tick(counter) or self.state.failure is not None:
            return True
        if self.drain_deadline is None:
            return False
        if self.state.drained:
            return True
        if time.monotonic() > self.drain_deadline:
            log.warning("drain timeout (%.0f s) passed with requests unanswered", self.drain_timeout_s)
            return True
        return False


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    """How `sida serve` runs uvicorn: on the settings' address, with a deadline on each request's head
    (`head_timeout_s`; each one missed is counted as `sida_requests_total{endpoint="unmatched",status="408"}`,
    no path having been read) and the drain timeout as uvicorn's graceful-shutdown timeout."""
    state: State = app.state.sida

    def count_timeout() -> None:
        if state.metrics is not None:
            state.metrics.requests.labels(UNMATCHED, "408").inc()

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        http=head_timeout_protocol(settings.head_timeout_s, on_timeout=count_timeout),
    )


def exposed_without_key(host: str, api_key: str | None) -> bool:
    """Whether serving on `host` lets other machines call the model with no key: any address but loopback
    (127.0.0.0/8, ::1, "localhost"), with no (or an empty) API key."""
    if api_key:
        return False
    if host.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return True


def warn_if_exposed(settings: Settings) -> None:
    """One warning line at start-up when `exposed_without_key`."""
    if exposed_without_key(settings.host, settings.api_key):
        log.warning(
            "serving on %s:%d with no API key: anyone who can reach this address can use the model; "
            "set SIDA_API_KEY or --host 127.0.0.1",
            settings.host,
            settings.port,
        )


def cmd_serve(args, settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_if_exposed(settings)
    if settings.replicas is not None:
        try:
            from sida.server import ray_serve  # an optional extra: plain `sida serve` never imports Ray
        except ImportError as e:
            raise SettingsError(f"replicas needs Ray Serve: pip install 'sida[ray]' ({e})") from None

        return ray_serve.run(settings, settings.replicas, args.hash, settings.ray_address)
    # The model loads before the port is bound (as uvicorn binds after the lifespan's start-up anyway), so that a
    # bad model folder, predictor or expert_dir ends in `main` as one line and status 2.
    app = app_from_settings(settings, args.hash, preload=True)
    state: State = app.state.sida
    GracefulServer(uvicorn_config(app, settings), state, settings.drain_timeout_s).run()
    if state.failure is not None:
        print(f"sida: error: {state.failure}; exiting for a restart", file=sys.stderr)
        sys.exit(EXIT_WORKER_FAILED)


def cmd_config(args, settings: Settings) -> None:
    print(yaml.safe_dump(json.loads(settings.model_dump_json()), sort_keys=False), end="")


def cmd_build_demo(argv: list[str]) -> None:
    # offline tool: the serving daemon never loads the demo-model builder
    from sida.demo_model import build

    build.main(argv)


def main(argv: list[str] | None = None) -> None:
    """`sida …`: one command; a bad setting, model folder, file or value ends with one line and exit status 2
    (PredictorError is a ValueError; an OSError names its file)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "build-demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "build-demo":
            return cmd_build_demo(rest)
        if args.command == "predictor":
            return predictor_cli.run(args)
        settings = _settings(args)
        if args.command != "config":
            check_expert_dir(settings)
        commands = {
            "classify": cmd_classify,
            "complete": cmd_complete,
            "eval": cmd_eval,
            "config": cmd_config,
            "serve": cmd_serve,
        }
        commands[args.command](args, settings)
    except SettingsError as e:  # already phrased for the user: one line per bad field
        print(f"sida: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ModelLoadError, OSError, ValueError) as e:
        print("sida: error:", " ".join(str(e).split()), file=sys.stderr)  # one line, whatever a library wrote
        sys.exit(2)


if __name__ == "__main__":
    main()
