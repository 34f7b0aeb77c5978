"""Training: the loop (``train``), the optimizer and schedule (``optim``), checkpoints and model
loading (``checkpoint``), and evaluation (``evaluate``).

``python -m flashlm.training.train RECIPE.yaml`` (or ``flashlm train``) runs a recipe.
"""
