"""The predictor shipped with the demo model, against its model's real routing (issue 6's targets)."""

from sida.predictor.artifact import find_predictor, load_predictor
from sida.predictor.corpora import read_inputs
from sida.predictor.traces import collect_traces
from sida.predictor.train import hit_rates


def test_shipped_predictor_hits_the_routers_choice(demo_loaded, data_dir):
    """SST-2 dev, real tokens of both encoder MoE layers: top-1 ≥ 0.95, top-3 ≥ 0.995 (full dev set, measured
    when shipped: see the model's predictor.json and README); here on 300 sentences."""
    pred, _ = load_predictor(find_predictor(demo_loaded.path), demo_loaded.fingerprint)
    traces = collect_traces(demo_loaded, read_inputs(data_dir / "sst2" / "dev.tsv", 300))
    rates = hit_rates(pred, traces)
    assert rates["tokens"] > 5000
    assert rates["top1_hit_rate"] >= 0.95 and rates["top3_hit_rate"] >= 0.995, rates
