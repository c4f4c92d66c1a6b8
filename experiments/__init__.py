"""Experiments reproducing claims of the SlimAdam paper (Kalra et al. 2025), Orvieto & Gower 2025,
Sophia (Liu et al.) and Muon (Jordan et al.) at CPU scale.

Run from the repository root as ``python -m experiments.<name>`` (``--quick`` for a smoke test);
results go to ``experiments/results/<name>/``. Shared code lives in `experiments._lib`.
"""
