"""docker/compose.yaml, Prometheus's config and Grafana's provisioning read as Docker, Prometheus and Grafana
would read them: every mounted file exists, names and ports agree across the files, and every series the
dashboard asks for is one the daemon exports."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


class _ComposeLoader(yaml.SafeLoader):
    """Compose's YAML: `!reset` (drop a value when merging files) read as None."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def load(name: str) -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=_ComposeLoader)


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source with `${VAR:-default}` at its default, target) of each short-syntax volume."""
    out = []
    for volume in service.get("volumes", []):
        source, target = _DEFAULT.sub(lambda m: m.group(2), volume).split(":")[:2]
        out.append((source, target))
    return out


def bind_source(source: str) -> Path | None:
    return (DOCKER / source).resolve() if source.startswith(".") else None


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("compose.yaml")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "sida.json").read_text())


def test_services_ports_and_build(compose):
    services = compose["services"]
    assert set(services) == {"daemon", "prometheus", "grafana"}
    assert services["daemon"]["ports"] == ["8000:8000"]
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    build = services["daemon"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"
    (device,) = services["daemon"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_every_mount_exists(compose):
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in mounts(service):
            path = bind_source(source)
            if path is None:
                assert source in named, f"{name}: volume {source} is not declared"
            else:
                assert path.exists(), f"{name}: {source} (mounted at {target}) is not in the repo"
    daemon_mounts = dict((t, s) for s, t in mounts(compose["services"]["daemon"]))
    assert (bind_source(daemon_mounts["/models"]) / "sida-switch-demo" / "config.json").is_file()


def test_prometheus_reads_the_shipped_config_and_scrapes_the_daemon(compose):
    service = compose["services"]["prometheus"]
    mounted = {target: bind_source(source) for source, target in mounts(service)}
    flags = dict(f.removeprefix("--").split("=", 1) for f in service["command"])
    assert mounted[flags["config.file"]] == DOCKER / "prometheus.yml"
    config = load("prometheus.yml")
    for rule_file in config["rule_files"]:
        assert mounted[rule_file] == DOCKER / "alerts.yml"
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "daemon" and port == compose["services"]["daemon"]["ports"][0].split(":")[1]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert mounted["/prometheus"] is None  # a named volume keeps the data across restarts


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose, dashboard):
    service = compose["services"]["grafana"]
    mounted = {target: bind_source(source) for source, target in mounts(service)}
    provisioning = mounted["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert compose["services"]["prometheus"]["ports"][0].endswith(":9090")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sida.yaml").read_text())["providers"]
    folder = provider["options"]["path"]
    assert (mounted[folder] / "sida.json").is_file()
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounted[folder] / Path(home).relative_to(folder)).is_file()
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    uids |= {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["uid"]}


def test_cpu_override_resets_the_gpu_reservation():
    override = load("compose.cpu.yaml")["services"]["daemon"]
    assert override["deploy"] is None
    declared = {
        line.split()[1].split("=")[0]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("ARG ")
    }
    assert set(override["build"]["args"]) <= declared
    assert override["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
        assert p["type"] == "timeseries" and p["title"] and p["targets"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"])
        assert p["fieldConfig"]["defaults"]["unit"]


_SUFFIXES = {
    "PCounter": ("_total",),
    "CounterMetricFamily": ("_total",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "Info": ("_info",),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
}


def exported_series() -> set[str]:
    """Every series name the daemon exports, read from server/metrics.py's syntax tree, with the suffixes
    prometheus_client adds; the engine's plain counters are built from a dict of name → (doc, value)."""
    tree = ast.parse((REPO / "server" / "metrics.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SUFFIXES and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and str(first.value).startswith("sida_"):
                names |= {first.value + s for s in _SUFFIXES[node.func.id]}
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and str(k.value).startswith("sida_")]
            names |= {k + "_total" for k in keys}
    return names


def test_every_series_in_the_dashboard_and_rules_is_exported(dashboard):
    exported = exported_series()
    assert {
        "sida_requests_total",
        "sida_request_duration_seconds_bucket",
        "sida_expert_stall_seconds_total",
    } <= exported
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in load("alerts.yml")["groups"] for r in g["rules"]]
    used = {name for e in exprs for name in re.findall(r"\bsida_\w+", e)}
    assert used and used <= exported, f"not exported by server/metrics.py: {sorted(used - exported)}"
