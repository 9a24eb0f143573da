"""How well can decoder routing be guessed one step ahead? Fit `PrevTokenTable` on teacher-forced C4
continuations, measure on WikiText-2 valid continuations (never trained on). Prints one JSON object.

    .venv/bin/python bench/decoder_routing.py --model models/sida-switch-demo --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from sida.offload.model_loader import load_model
    from sida.offload.runner import Runner
    from sida.predictor.corpora import read_c4_texts, read_wikitext_paragraphs
    from sida.predictor.decoder_guess import PrevTokenTable, decoder_hit_rates, decoder_routes
    from sida.predictor.traces import lm_batches

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(REPO / "models" / "sida-switch-demo"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--fit-docs", type=int, default=1000)
    args = p.parse_args()
    loaded = load_model(args.model)
    runner = Runner(loaded)
    data = Path(args.data)
    c4 = [t for t in read_c4_texts(data / "c4_sample" / "c4_sample.jsonl", args.fit_docs) if len(t.split()) > 60]
    table = PrevTokenTable(loaded.config.vocab_size, loaded.config.num_experts)
    table.fit(decoder_routes(loaded, lm_batches(runner, c4)))
    wiki = read_wikitext_paragraphs(data / "wikitext2" / "wiki.valid.tokens", 600)
    print(
        json.dumps(
            {
                "fit": f"{len(c4)} C4 documents",
                "measured_on": f"{len(wiki)} WikiText-2 valid paragraphs",
                "layers": decoder_hit_rates(table, decoder_routes(loaded, lm_batches(runner, wiki))),
            }
        )
    )


if __name__ == "__main__":
    main()
