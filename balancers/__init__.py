"""Gradient-balancing methods, each a drop-in ``torch.optim.Optimizer`` wrapper.

Every class subclasses :class:`mtl.BalancedOptimizer` and is used the same way::

    opt = MGDA(torch.optim.Adam(model.parameters(), lr=1e-3), num_tasks=2)
    info = opt.backward(losses, representation=out.representation)
    opt.step()
"""

from ._min_norm import min_norm_weights, project_simplex
from .equal import EqualWeight
from .gradops import GradOPS, gradops_coefficients, gradops_projections, gradops_tradeoff_weights
from .marigold import MARIGOLD
from .mgda import MGDA, mgda_weights
from .multibalance import MultiBalance, multibalance_weights, update_norm_averages
from .pcgrad import PCGrad, pcgrad_coefficients, pcgrad_orders, pcgrad_projections
from .regularizers import LSPR, SCR, PerturbationRegularizer

__all__ = [
    "LSPR",
    "MARIGOLD",
    "MGDA",
    "SCR",
    "EqualWeight",
    "GradOPS",
    "MultiBalance",
    "PCGrad",
    "PerturbationRegularizer",
    "gradops_coefficients",
    "gradops_projections",
    "gradops_tradeoff_weights",
    "mgda_weights",
    "min_norm_weights",
    "multibalance_weights",
    "pcgrad_coefficients",
    "pcgrad_orders",
    "pcgrad_projections",
    "project_simplex",
    "update_norm_averages",
]
