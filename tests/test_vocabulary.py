"""One flag vocabulary for the ``mlet`` command and the TorchX components of ``launch/components.py``.

Every subcommand (nested ones too, e.g. ``mlet convert criteo``) and every component prints its help; the
flags they share are spelled the same (``--input``, never ``--checkpoint``; TorchX writes a parameter
``check_split`` as ``--check_split``, its own convention, so names are compared with ``_`` for ``-``) and have
the same defaults, except the deliberate differences listed below with their reasons.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torchx import specs
from torchx.specs.builders import _create_args_parser

from mlet_torchrec.cli.main import build_parser, main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import components  # noqa: E402

TORCHX_ONLY = {"j", "image", "name", "h", "cpu", "gpu", "memMB", "env", "mounts", "max_retries", "rdzv_port", "debug"}
"""TorchX's launch parameters (processes, resources, image, scheduler): ``mlet`` has none of them; its
``--nproc-per-node N`` is TorchX's ``-j 1xN``."""

VOCABULARY = ("config", "input", "output", "seed")
"""What a component must offer whenever its ``mlet`` subcommand has it."""

DELIBERATE = {
    ("demo", "nproc_per_node"): "the demo exists to show 2 ranks reproducing 1 process",
    ("demo", "output"): "the demo's work directory has a home, runs/demo, so that `mlet demo` runs bare",
    ("demo", "data"): "where the demo generates its synthetic data, not a data set to score",
    ("convert", "seed"): "the seed of the random split: 0, so that converting twice gives the same split",
    ("convert", "split"): "convert's --split TRAIN VALID TEST are the fractions it splits by (default per data set); "
    "elsewhere --split names the split to use (default test)",
    ("convert", "min_count"): "each data set's papers' vocabulary cut-off (Criteo 10, Avazu 5, MovieLens 1)",
    ("serve", "max_rows"): "a server limit, rows per request (more: 413); elsewhere --max-rows caps the rows scored",
}
"""(subcommand, flag) -> why its default differs from the other subcommands' (``convert`` covers its datasets)."""

COMPONENT_ONLY = {
    ("convert", "max_restarts"): "torchrun's restarts of a job's ranks; `mlet convert --jobs N` replaces a dead "
    "worker process itself (data_pipes/convert/passes.py MAX_RESTARTS)",
}
"""(component, parameter) -> why ``mlet`` has no such flag."""


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommands(sub, (*path, name))


SUBCOMMANDS = dict(_subcommands(build_parser()))
COMPONENTS = {
    name: fn
    for name, fn in inspect.getmembers(components, inspect.isfunction)
    if not name.startswith("_") and inspect.signature(fn).return_annotation in (specs.AppDef, "specs.AppDef")
}


def _flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, Any]]:
    """dest -> (visible long option, default) of the flags ``--help`` shows (old spellings are hidden)."""
    return {
        a.dest: (next(o for o in a.option_strings if o.startswith("--")), a.default)
        for a in parser._actions
        if a.option_strings and a.help is not argparse.SUPPRESS and a.dest not in ("help", "log_level")
    }


def test_there_is_something_to_compare():
    assert {"train", "collapse", "evaluate", "sweep"} <= {p[-1] for p in SUBCOMMANDS}
    assert {"train", "collapse", "evaluate"} <= set(COMPONENTS)


@pytest.mark.parametrize("path", sorted(SUBCOMMANDS), ids=" ".join)
def test_every_subcommand_prints_help_and_spells_each_flag_after_its_name(capsys, path):
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0 and f"mlet {' '.join(path)}" in capsys.readouterr().out
    for dest, (option, _) in _flags(SUBCOMMANDS[path]).items():
        assert option == "--" + dest.replace("_", "-"), (path, dest, option)


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_every_component_prints_help(capsys, name):
    with pytest.raises(SystemExit) as done:
        _create_args_parser(COMPONENTS[name]).parse_args(["--help"])
    assert done.value.code == 0 and f"{name} " in capsys.readouterr().out


def test_shared_flags_have_the_same_defaults_across_subcommands():
    defaults: dict[str, dict[Any, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, parser in SUBCOMMANDS.items():
        for dest, (_, default) in _flags(parser).items():
            if (path[0], dest) not in DELIBERATE:
                defaults[dest][repr(default)].append(" ".join(path))
    differ = {dest: dict(seen) for dest, seen in defaults.items() if len(seen) > 1}
    assert not differ, differ


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_each_component_speaks_its_subcommands_vocabulary(name):
    """Every component parameter but TorchX's own is a flag of ``mlet NAME`` with the same default."""
    mlet = _flags(SUBCOMMANDS[(name,)])
    params = inspect.signature(COMPONENTS[name]).parameters
    for param in params.values():
        if param.name in TORCHX_ONLY or (name, param.name) in COMPONENT_ONLY:
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:  # the config overrides, handed on unchanged
            assert any(a.dest == param.name and not a.option_strings for a in SUBCOMMANDS[(name,)]._actions)
            continue
        assert param.name in mlet, f"component {name} has --{param.name}; mlet {name} has no such flag"
        default = None if param.default is inspect.Parameter.empty else param.default
        mlet_default = mlet[param.name][1]
        if param.default is inspect.Parameter.empty:  # required in the component: so in mlet, or given
            continue
        assert default == mlet_default, (name, param.name, default, mlet_default)
    missing = [flag for flag in VOCABULARY if flag in mlet and flag not in params]
    assert not missing, f"component {name} lacks {missing} of mlet {name}"
