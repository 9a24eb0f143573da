"""The contracts of offload/contracts.py hold: the real implementations and the server tests' fakes have every
member of the protocol they stand for, and their methods take the protocol's parameters (by name, so that a
keyword call works on both)."""

from __future__ import annotations

import inspect

import pytest
import torch

from sida.offload.contracts import DecodeStepGuesser, HashFunction, LayerAheadScorer, ServingRunner
from sida.offload.lookahead import RouterScorer
from sida.offload.runner import Runner
from sida.predictor.decode_ahead import DecodeAhead
from sida.predictor.decoder_guess import DecoderGuess
from sida.predictor.network import PredictorHash
from sida.predictor.oracle import OracleHash
from tests.server import fakes
from tests.server.test_worker_faults import FaultyRunner
from tests.server.test_workers import FakeRunner as RecordingRunner


def members(proto: type) -> dict[str, object]:
    """The protocol's members: its annotated attributes (None) and its methods and properties."""
    found: dict[str, object] = dict.fromkeys(vars(proto).get("__annotations__", {}))
    for name, value in vars(proto).items():
        if (callable(value) or isinstance(value, property)) and (not name.startswith("_") or name == "__call__"):
            found[name] = value
    return found


def gaps(obj, proto: type) -> list[str]:
    """What `obj` (an instance, or a class when the protocol has no data attributes) lacks of `proto`, or takes
    with parameters other than the protocol's."""
    out = []
    cls = obj if inspect.isclass(obj) else type(obj)
    for name, spec in members(proto).items():
        if not hasattr(obj, name):
            out.append(f"{name}: missing")
        elif inspect.isfunction(spec):
            want = list(inspect.signature(spec).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            if got != want:
                out.append(f"{name}{tuple(got)}: expected {tuple(want)}")
    return out


def test_gaps_names_missing_members_and_other_parameters():
    class Partial:
        device = torch.device("cpu")

        def pad(self, rows):
            return rows

    found = gaps(Partial(), ServingRunner)
    assert "engine: missing" in found and "tokenize: missing" in found and "tasks: missing" in found
    assert "pad('self', 'rows'): expected ('self', 'ids')" in found


def test_the_runner_is_the_serving_runner(demo_loaded):
    runner = Runner(demo_loaded)
    assert gaps(runner, ServingRunner) == [] and isinstance(runner, ServingRunner)


@pytest.mark.parametrize("hash_fn", [PredictorHash, OracleHash])
def test_the_predictor_and_the_oracle_are_hash_functions(hash_fn):
    assert gaps(hash_fn, HashFunction) == []


def test_the_decoder_guess_is_a_decode_step_guesser():
    guess = DecoderGuess({3: torch.zeros(4, 2, dtype=torch.int16)})
    assert gaps(guess, DecodeStepGuesser) == [] and isinstance(guess.to("cpu"), DecodeStepGuesser)


@pytest.mark.parametrize("fake", [fakes.FakeRunner, RecordingRunner, FaultyRunner])
def test_the_server_tests_fakes_are_serving_runners(fake):
    runner = fake()
    assert gaps(runner, ServingRunner) == [] and isinstance(runner, ServingRunner)


def test_layer_ahead_scorers_fulfil_the_contract():
    assert gaps(RouterScorer, LayerAheadScorer) == []
    want = list(inspect.signature(LayerAheadScorer.__call__).parameters)
    assert list(inspect.signature(DecodeAhead.forward).parameters) == want  # an nn.Module's call is its forward
