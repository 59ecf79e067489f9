"""mtl: multi-task gradient balancing for PyTorch ranking models (core).

The public entry points are :class:`BalancedOptimizer` (subclassed by every method in
:mod:`balancers`) and :class:`BalanceInfo`; models live in :mod:`mtl.models`, metrics in
:mod:`mtl.metrics`.
"""

from ._combined import CombinedOptimizer
from ._gram import gram_matrix
from ._graph import depends_on
from ._info import BalanceInfo, NonFiniteError
from ._optimizer import BalancedOptimizer
from .conflict import ConflictTracker

__all__ = [
    "BalanceInfo",
    "BalancedOptimizer",
    "CombinedOptimizer",
    "ConflictTracker",
    "NonFiniteError",
    "depends_on",
    "gram_matrix",
]
__version__ = "0.1.0"
