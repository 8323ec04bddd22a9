"""TorchX components for ``mlet`` (see ``launch/components.py``).

Used by path from the ``torchx`` CLI (``torchx run -s SCHEDULER launch/components.py:train ...``);
the package marker only lets tests and notebooks ``import launch.components``.
"""
