"""Gradient-balancing methods, each a drop-in ``torch.optim.Optimizer`` wrapper.

Every class subclasses :class:`mtl.BalancedOptimizer` and is used the same way::

    opt = MGDA(torch.optim.Adam(model.parameters(), lr=1e-3), num_tasks=2)
    info = opt.backward(losses, representation=out.representation)
    opt.step()
"""

from ._min_norm import min_norm_weights, project_simplex
from .equal import EqualWeight
from .mgda import MGDA, mgda_weights

__all__ = ["MGDA", "EqualWeight", "mgda_weights", "min_norm_weights", "project_simplex"]
