"""flashlm's Triton kernels, one sub-package per op (``flashlm.kernels.attention``, ...).

Their code lives in the repository's top-level ``kernels/`` folder; ``pyproject.toml`` maps each
of its sub-packages here (setuptools ``package-dir``), in editable installs and wheels alike.
``kernels/`` has no ``__init__.py`` of its own, so that with the repository root on ``sys.path``
it never shadows another distribution's ``kernels`` package (the one transformers imports).
"""
