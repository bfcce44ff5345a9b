"""The soak test of serve.py (benchmarks/serve_load.py) for 15 seconds after its 45-second warm-up: 64 openai
clients over 16 random adapters of a tiny random checkpoint, streaming and not, a quarter of the streams cut short, the
server's queue small enough that some requests are refused with 429. Its checks must pass, and the run must have been
the one they speak of."""

import sys

import pytest

from conftest import ROOT, shared_file

pytest.importorskip("openai")
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402  after the path is set


def test_under_load_every_answer_is_right_nothing_is_lost_and_memory_stays_flat():
    shared_file("tokenizer.model")  # the tiny checkpoint's tokenizer
    soak = serve_load.main(seconds=15)
    assert soak.passed, soak.checks
    # what makes the checks mean something: each adapter answers each prompt its own way (a row given another row's
    # adapter would show), and the load did refuse requests, cut streams short and complete many answers
    assert soak.distinct == [16] * len(serve_load.PROMPTS)
    assert soak.load.statuses[429] > 0 and soak.load.disconnected > 0 and soak.load.completed >= 200
    assert soak.load.ended["cancelled"] > 0  # some cut streams were cancelled in the server, not generated to the end
