"""``mlet``: argument parsing only; each subcommand calls one function of a lower layer.

The entry point is :func:`mlet_torchrec.cli.main.main`. This package imports nothing itself, so that
``python -m mlet_torchrec.cli.convert`` (the standalone converter) runs without runpy finding its module
already imported.
"""
