"""Gradient-balancing methods, each a drop-in ``torch.optim.Optimizer`` wrapper.

Every class subclasses :class:`mtl.BalancedOptimizer` and is used the same way::

    opt = MGDA(torch.optim.Adam(model.parameters(), lr=1e-3), num_tasks=2)
    info = opt.backward(losses, representation=out.representation)
    opt.step()
"""

from ._min_norm import min_norm_weights, project_simplex
from .alignedmtl import AlignedMTL, alignedmtl_weights
from .cagrad import CAGrad, cagrad_weights
from .dwa import DWA, dwa_weights
from .equal import EqualWeight
from .famo import FAMO, famo_logit_gradient, famo_update, famo_weights
from .gls import GLS, gls_weights
from .gradnorm import GradNorm, gradnorm_step
from .gradops import GradOPS, gradops_coefficients, gradops_projections, gradops_tradeoff_weights
from .imtlg import IMTLG, imtlg_weights
from .marigold import MARIGOLD
from .mgda import MGDA, MGDACollapseWarning, collapsed_tasks, mgda_weights
from .multibalance import (
    MultiBalance,
    MultiBalanceClampWarning,
    multibalance_weights,
    update_norm_averages,
)
from .multibalance_s import MultiBalanceS, multibalance_s_step
from .nashmtl import NashMTL, nashmtl_weights
from .pcgrad import PCGrad, pcgrad_coefficients, pcgrad_orders, pcgrad_projections
from .regularizers import LSPR, SCR, PerturbationRegularizer
from .rlw import RLW, rlw_weights
from .upgrad import UPGrad, upgrad_weights
from .uw import UW, uw_coefficients, uw_gradient

__all__ = [
    "AlignedMTL",
    "CAGrad",
    "DWA",
    "EqualWeight",
    "FAMO",
    "GLS",
    "GradNorm",
    "GradOPS",
    "IMTLG",
    "LSPR",
    "MARIGOLD",
    "MGDA",
    "MultiBalance",
    "MultiBalanceS",
    "NashMTL",
    "PCGrad",
    "PerturbationRegularizer",
    "RLW",
    "SCR",
    "UPGrad",
    "UW",
    "alignedmtl_weights",
    "cagrad_weights",
    "dwa_weights",
    "famo_logit_gradient",
    "famo_update",
    "famo_weights",
    "gls_weights",
    "gradnorm_step",
    "gradops_coefficients",
    "gradops_projections",
    "gradops_tradeoff_weights",
    "imtlg_weights",
    "mgda_weights",
    "MGDACollapseWarning",
    "collapsed_tasks",
    "MultiBalanceClampWarning",
    "min_norm_weights",
    "multibalance_s_step",
    "multibalance_weights",
    "nashmtl_weights",
    "pcgrad_coefficients",
    "pcgrad_orders",
    "pcgrad_projections",
    "project_simplex",
    "rlw_weights",
    "update_norm_averages",
    "upgrad_weights",
    "uw_coefficients",
    "uw_gradient",
]
