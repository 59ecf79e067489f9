"""Runnable multi-task experiments: ``python -m experiments {run,compare,sweep,list,bench} ...``.

Run from a checkout (this package is never installed). ``python -m experiments --help`` lists
the commands; configurations of the provided experiments live in ``experiments/configs/``.
The README's main-job command::

    python -m experiments compare --task synthetic --balancers all --seeds 3 --out runs/synthetic
"""
