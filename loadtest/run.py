"""`make loadtest`: start `sida serve` on loopback, run the locust load test headless against it for a bounded
time, write its CSV and HTML report, stop the server. The exit status is locust's: 0 when the run met its
thresholds, 1 when it did not (loadtest/README.md).

    .venv/bin/python loadtest/run.py --run-time 60s --users 8 --out runs/loadtest
    .venv/bin/python loadtest/run.py --host http://10.0.0.5:8000 -- --sida-p95-ms complete=800   # no local server

Arguments after `--` go to locust as they are (the `--sida-*` options of loadtest/locustfile.py among them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.live_server import start_serve  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/sida-switch-demo", help="model folder `sida serve` serves")
    p.add_argument("--host", help="an already running server to test (no local `sida serve` is started)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    p.add_argument("--run-time", default="60s", help="how long locust sends calls (locust's --run-time)")
    p.add_argument("--users", type=int, default=8, help="concurrent simulated clients")
    p.add_argument("--spawn-rate", type=float, default=4, help="users started per second")
    p.add_argument("--out", default="runs/loadtest", help="folder of the CSV files (sida_*.csv) and report.html")
    p.add_argument("--serve-flag", action="append", default=[], help="one more `sida serve` argument (repeatable)")
    return p.parse_args(argv), extra


def locust_command(args: argparse.Namespace, host: str, out: Path, extra: list[str]) -> list[str]:
    """The headless locust run, its CSV files and HTML report in `out`."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "--host",
        host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--stop-timeout",
        "30",  # calls in flight at the end are finished and counted
        "--csv",
        str(out / "sida"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--sida-data",
        str(Path(args.data).resolve()),
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()  # locust runs in the repository root
    out.mkdir(parents=True, exist_ok=True)
    server = None
    host = args.host
    if host is None:
        flags = ["--model", args.model, "--host", "127.0.0.1", "--log-level", "warning", *args.serve_flag]
        server, host = start_serve(flags)
    try:
        return subprocess.run(locust_command(args, host, out, extra), cwd=REPO).returncode
    finally:
        if server is not None:
            server.terminate()  # SIGTERM: the server answers what it accepted, then exits
            server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
