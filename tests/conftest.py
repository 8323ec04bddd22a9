# data_pipes fixtures
from collections.abc import Callable
from pathlib import Path

import pytest

from mlet_torchrec.logs import KNOWN_WARNINGS


def pytest_configure(config: pytest.Config) -> None:
    # the library warnings mlet itself silences (each with its reason in mlet_torchrec/logs.py); every
    # other warning shows in the test summary
    for message, category, _why in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


TINY_SYNTH = dict(
    rows=3000, num_dense=3, num_sparse=4, min_cardinality=5, max_cardinality=500, row_group_size=256, seed=1
)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Callable[..., Path]:
    """``synth_dataset(**overrides) -> Path``: a tiny generated data set (TINY_SYNTH + overrides),
    built once per session per distinct overrides. Treat it as read-only."""
    from data_pipes.synth import SynthConfig, generate

    cache: dict[tuple, Path] = {}

    def make(**overrides) -> Path:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("synth") / "data"
            generate(SynthConfig(**{**TINY_SYNTH, **overrides}), out, progress=False)
            cache[key] = out
        return cache[key]

    return make
