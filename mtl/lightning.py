"""PyTorch Lightning integration: balanced backward passes that go through Lightning's strategy.

Install with ``pip install 'mtl-balance[lightning]'`` (the unified ``lightning`` package; the
standalone ``pytorch_lightning`` package works too). ``import mtl`` never imports Lightning; this
module does not either (it only checks that it is installed): it works with the objects the
Trainer hands you.

Why it is needed. With manual optimization Lightning runs ``training_step`` *inside*
``DistributedDataParallel``'s forward, with DDP's gradient synchronization switched off, and
switches it on for each backward pass routed through its strategy:
``LightningModule.manual_backward(loss)`` calls ``strategy.pre_backward(loss)``, which prepares
DDP's reducer (``prepare_for_backward``). A balanced ``opt.backward(losses, representation=z)``
called directly is not routed: DDP's gradient hooks ignore the pass, every rank keeps its own
gradients and the ranks drift apart. (On top of that, ``self.optimizers()`` returns Lightning's
``LightningOptimizer``, which imitates the wrapped class; calling ``backward`` on it runs
``BalancedOptimizer.backward`` with the wrapper as ``self``, so the balancer state is written to
the wrapper and never reaches checkpoints.)

The fix, one of:

* subclass :class:`BalancedLightningModule` (before ``LightningModule``)::

      class Model(BalancedLightningModule, L.LightningModule):   # manual optimization is set
          def training_step(self, batch, batch_idx):
              out = self(batch.x)
              losses = [...]
              opt = self.optimizers()          # backward/step routed through the strategy
              opt.zero_grad()
              info = opt.backward(losses, representation=out.representation)
              opt.step()

* or, in any ``LightningModule`` with ``automatic_optimization = False``::

      info = balanced_manual_backward(self, opt, losses, representation=out.representation)
      opt.step()

:func:`balanced_manual_backward` runs what ``manual_backward`` runs around the balanced backward:
``strategy.pre_backward`` (DDP's reducer is prepared, with the task losses as the outputs it
searches for unused parameters), the precision plugin's ``pre_backward`` / ``post_backward``
(the ``on_before_backward`` / ``on_after_backward`` hooks; with a ``GradScaler`` each task loss is
scaled) and ``strategy.post_backward`` (DDP's delayed all-reduce on a ``static_graph`` first
iteration). The engine's per-task passes are ``autograd.grad`` calls that never reach DDP's
hooks; its one ordinary backward is then all-reduced by DDP as usual.

With :class:`BalancedLightningModule`, a balanced backward that bypassed the strategy under DDP
(the ``BalancedOptimizer`` itself called: ``self.trainer.optimizers[0]``, ``opt.optimizer``, a
reference kept from ``configure_optimizers``) makes the next ``opt.step()`` raise a
``RuntimeError`` that names the fix, before anything is stepped. The check compares two host
counters; it adds no device synchronization.

Supported strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``,
``DDPStrategy(...)``, any ``find_unused_parameters`` / ``static_graph``). FSDP, DeepSpeed, XLA and
model-parallel strategies raise ``NotImplementedError``; so does Lightning Fabric.
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import MethodType
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ._info import BalanceInfo
from ._optimizer import BalancedOptimizer

__all__ = [
    "BYPASS_ERROR",
    "INSTALL_HINT",
    "BalancedLightningModule",
    "balanced_manual_backward",
    "is_lightning_optimizer",
    "route_class",
    "route_optimizer",
    "unwrap_optimizer",
]

#: the command that installs what this module needs
INSTALL_HINT = "pip install 'mtl-balance[lightning]'"

if (
    importlib.util.find_spec("lightning") is None
    and importlib.util.find_spec("pytorch_lightning") is None
):  # pragma: no cover - depends on the environment
    raise ImportError(f"mtl.lightning needs PyTorch Lightning: {INSTALL_HINT}")

_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_UNSUPPORTED_STRATEGIES = ("DeepSpeed", "FSDP", "XLA", "ModelParallel")

BYPASS_ERROR = (
    "step(): a balanced backward since the last step did not go through Lightning's strategy, "
    "and the model is wrapped in DistributedDataParallel. In manual optimization Lightning runs "
    "training_step inside DDP's forward with gradient synchronization off and turns it on only "
    "for backward passes routed through the strategy, so that backward's gradients were not "
    "all-reduced and the ranks would drift apart; the step was not taken. Fix: call backward on "
    "the optimizer that self.optimizers() returns (opt.backward(losses, representation=z), "
    "routed by BalancedLightningModule), self.balanced_backward(losses, representation=z), or "
    "mtl.lightning.balanced_manual_backward(self, opt, losses, representation=z) -- not on the "
    "BalancedOptimizer itself (self.trainer.optimizers[i], opt.optimizer, or a reference kept "
    "from configure_optimizers)."
)


# ---------------------------------------------------------------------- the optimizer wrapper
def _mro_names(obj: object) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def _lightning_optimizer_class(optimizer: object) -> Any:
    """Lightning's ``LightningOptimizer`` class in the MRO of ``optimizer``, or ``None``.

    Matched by name, so that both ``lightning.pytorch`` and ``pytorch_lightning`` work without
    importing either."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ == "LightningOptimizer":
            return cls
    return None


def is_lightning_optimizer(optimizer: object) -> bool:
    """Whether ``optimizer`` is Lightning's ``LightningOptimizer`` wrapper (what
    ``self.optimizers()`` returns) around a :class:`~mtl.BalancedOptimizer`."""
    return _lightning_optimizer_class(optimizer) is not None and isinstance(
        vars(optimizer).get("_optimizer"), BalancedOptimizer
    )


def unwrap_optimizer(optimizer: Any) -> BalancedOptimizer:
    """The :class:`~mtl.BalancedOptimizer` behind Lightning's ``LightningOptimizer`` (or
    ``optimizer`` itself). ``TypeError`` for anything else."""
    if is_lightning_optimizer(optimizer):
        inner: BalancedOptimizer = vars(optimizer)["_optimizer"]
        return inner
    if _lightning_optimizer_class(optimizer) is not None:
        wrapped = vars(optimizer).get("_optimizer")
        raise TypeError(
            "a balanced backward needs a BalancedOptimizer (e.g. MGDA(torch.optim.Adam(...))) "
            f"returned by configure_optimizers; this LightningOptimizer wraps "
            f"{type(wrapped).__name__}"
        )
    if not isinstance(optimizer, BalancedOptimizer):
        raise TypeError(
            f"expected a BalancedOptimizer or Lightning's wrapper of one, got "
            f"{type(optimizer).__name__}"
        )
    return optimizer


# ---------------------------------------------------------------------- bypass bookkeeping
class _Guard:
    """Host counters of one BalancedOptimizer: its balanced backward passes (kept or skipped)
    at the last routed backward, ``zero_grad`` or ``step``, and whether one ran in between
    without the strategy. No baseline before the first of those events (a checkpoint restore
    may set the counters before training starts)."""

    __slots__ = ("baseline", "bypassed")

    def __init__(self) -> None:
        self.baseline: int | None = None
        self.bypassed = False

    def before_routed(self, opt: BalancedOptimizer) -> None:
        if self.baseline is not None and _count(opt) != self.baseline:
            self.bypassed = True

    def sync(self, opt: BalancedOptimizer) -> None:
        self.baseline = _count(opt)

    def reset(self, opt: BalancedOptimizer) -> None:
        self.baseline = _count(opt)
        self.bypassed = False

    def dirty(self, opt: BalancedOptimizer) -> bool:
        return self.bypassed or (self.baseline is not None and _count(opt) != self.baseline)


_GUARDS: weakref.WeakKeyDictionary[BalancedOptimizer, _Guard] = weakref.WeakKeyDictionary()


def _count(opt: BalancedOptimizer) -> int:
    return int(opt.num_steps) + int(opt.num_skipped)


def _guard(opt: BalancedOptimizer) -> _Guard:
    guard = _GUARDS.get(opt)
    if guard is None:
        guard = _GUARDS[opt] = _Guard()
    return guard


# ---------------------------------------------------------------------- the routed backward
def _check_strategy(strategy: Any) -> None:
    names = _mro_names(strategy)
    precision = strategy.precision_plugin
    backward_owner = next(
        (c.__name__ for c in type(precision).__mro__ if "backward" in vars(c)), None
    )
    if (
        not any(n in names for n in _SUPPORTED_STRATEGIES)
        or any(bad in n for n in names for bad in _UNSUPPORTED_STRATEGIES)
        or backward_owner != "Precision"
    ):
        raise NotImplementedError(
            f"a balanced backward under Lightning's {type(strategy).__name__} with "
            f"{type(precision).__name__} is not supported: mtl.lightning supports the "
            "single-device and DDP strategies (ddp, ddp_spawn, ddp_fork) with precision "
            "plugins that back-propagate with plain autograd"
        )


def _as_losses(losses: Sequence[Tensor] | Tensor) -> Tensor | list[Tensor]:
    return losses if isinstance(losses, Tensor) else list(losses)


def _detached_total(losses: Tensor | list[Tensor]) -> Tensor:
    """The sum of the task losses, detached: the ``loss`` Lightning's backward hooks receive
    (device ops only, no host read)."""
    if isinstance(losses, Tensor):
        return losses.detach().sum()
    return torch.stack([t.detach().reshape(()) for t in losses]).sum()


def _scaled_losses(
    precision: Any, inner: BalancedOptimizer, losses: Tensor | list[Tensor]
) -> Tensor | list[Tensor]:
    """The task losses scaled by the precision plugin's ``GradScaler`` (each one), or unchanged
    without one; a scaler needs a balancer built with ``on_nonfinite="skip"``."""
    scaler = getattr(precision, "scaler", None)
    if scaler is None:
        return losses
    if inner.on_nonfinite != "skip":
        raise ValueError(
            "Lightning's mixed precision uses a GradScaler: construct the balancer with "
            "on_nonfinite='skip', so that a step whose scaled gradients overflow is skipped "
            "(the balancer state untouched) and the scaler lowers its scale"
        )
    if isinstance(losses, Tensor):
        scaled: Tensor = scaler.scale(losses)
        return scaled
    return [scaler.scale(t) for t in losses]


def balanced_manual_backward(
    module: Any,
    optimizer: Any,
    losses: Sequence[Tensor] | Tensor,
    *,
    representation: Tensor | Sequence[Tensor] | None = None,
    shared_parameters: Iterable[Tensor] | None = None,
    **kwargs: Any,
) -> BalanceInfo:
    """``optimizer.backward(losses, ...)`` routed through ``module``'s Lightning strategy, the
    balanced counterpart of ``LightningModule.manual_backward``.

    Runs ``strategy.pre_backward`` (under DDP: the reducer is prepared, so DDP all-reduces the
    gradients of the step's one ordinary backward), the precision plugin's ``pre_backward``
    (``on_before_backward`` hooks, given the detached sum of the task losses), the balanced
    backward of the :class:`~mtl.BalancedOptimizer` behind ``optimizer``, then the precision
    plugin's and the strategy's ``post_backward`` (``on_after_backward`` hooks; DDP's delayed
    all-reduce on a ``static_graph`` first iteration). With a ``GradScaler`` (``precision=
    "16-mixed"``) every task loss is scaled first; construct the balancer with
    ``on_nonfinite="skip"`` then, so that overflowing steps are skipped and the scaler backs off.

    Args:
        module: the ``LightningModule`` (``self`` in ``training_step``), with
            ``automatic_optimization = False``. Outside a Trainer this is
            ``optimizer.backward(...)``.
        optimizer: what ``self.optimizers()`` returns (Lightning's wrapper) or the
            ``BalancedOptimizer`` itself.
        losses, representation, shared_parameters: as :meth:`mtl.BalancedOptimizer.backward`.
        **kwargs: passed on to ``backward`` (``closure=`` for MARIGOLD and FAMO).

    Returns:
        the :class:`~mtl.BalanceInfo` of the balanced backward.
    """
    inner = unwrap_optimizer(optimizer)
    if getattr(module, "_fabric", None) is not None:
        raise NotImplementedError(
            "mtl.lightning supports the Lightning Trainer, not Lightning Fabric"
        )
    trainer = getattr(module, "_trainer", None)
    if trainer is None:  # e.g. a unit test calling training_step: no strategy to route through
        return inner.backward(
            losses, representation=representation, shared_parameters=shared_parameters, **kwargs
        )
    if module.automatic_optimization:
        raise RuntimeError(
            f"{type(module).__name__}: a balanced backward needs manual optimization; set "
            "self.automatic_optimization = False in __init__ (BalancedLightningModule does)"
        )
    strategy = trainer.strategy
    _check_strategy(strategy)
    precision = strategy.precision_plugin
    task_losses = _as_losses(losses)
    scaled = _scaled_losses(precision, inner, task_losses)
    total = _detached_total(task_losses)
    guard = _guard(inner)
    guard.before_routed(inner)
    # the reducer searches the losses' graph for unused parameters (find_unused_parameters)
    strategy.pre_backward(scaled)
    precision.pre_backward(total, module)
    try:
        info = inner.backward(
            scaled, representation=representation, shared_parameters=shared_parameters, **kwargs
        )
    finally:
        guard.sync(inner)
    precision.post_backward(total, module)
    strategy.post_backward(total)
    return info


# ---------------------------------------------------------------------- routing the wrapper
def _wrapper_backward(
    self: Any,
    losses: Sequence[Tensor] | Tensor,
    *,
    representation: Tensor | Sequence[Tensor] | None = None,
    shared_parameters: Iterable[Tensor] | None = None,
    **kwargs: Any,
) -> BalanceInfo:
    """``backward`` of a routed ``LightningOptimizer``: :func:`balanced_manual_backward`."""
    return balanced_manual_backward(
        self._strategy.lightning_module,
        self,
        losses,
        representation=representation,
        shared_parameters=shared_parameters,
        **kwargs,
    )


def _wrapper_zero_grad(self: Any, set_to_none: bool = True) -> None:
    inner = unwrap_optimizer(self)
    inner.zero_grad(set_to_none=set_to_none)
    _guard(inner).reset(inner)


def _wrapper_step(self: Any, closure: Any = None, **kwargs: Any) -> Any:
    """``LightningOptimizer.step`` (through the strategy and the precision plugin), after
    checking that no balanced backward since the last step bypassed the strategy under DDP."""
    inner = unwrap_optimizer(self)
    guard = _guard(inner)
    if guard.dirty(inner) and isinstance(self._strategy.model, DistributedDataParallel):
        guard.reset(inner)
        raise RuntimeError(BYPASS_ERROR)
    out = _lightning_optimizer_class(self).step(self, closure, **kwargs)
    guard.reset(inner)
    return out


def _wrapper_state_dict(self: Any) -> dict[str, Any]:
    return unwrap_optimizer(self).state_dict()


def _wrapper_load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
    unwrap_optimizer(self).load_state_dict(state_dict)


_ROUTED: dict[str, Callable[..., Any]] = {
    "backward": _wrapper_backward,
    "zero_grad": _wrapper_zero_grad,
    "step": _wrapper_step,
    "state_dict": _wrapper_state_dict,
    "load_state_dict": _wrapper_load_state_dict,
}


def route_optimizer(optimizer: Any) -> Any:
    """Route Lightning's wrapper of a :class:`~mtl.BalancedOptimizer` through the strategy.

    On the ``LightningOptimizer`` that ``self.optimizers()`` returns, ``backward`` becomes
    :func:`balanced_manual_backward`; ``zero_grad``, ``state_dict`` and ``load_state_dict`` act
    on the BalancedOptimizer itself (never on the wrapper's copy of its attributes); ``step`` is
    Lightning's, after the bypass check (see the module docstring). Anything else is returned
    unchanged. Idempotent; returns ``optimizer``. :class:`BalancedLightningModule` calls it in
    ``optimizers()``.
    """
    if not is_lightning_optimizer(optimizer) or vars(optimizer).get("_mtl_routed", False):
        return optimizer
    _guard(unwrap_optimizer(optimizer))
    for name, function in _ROUTED.items():
        vars(optimizer)[name] = MethodType(function, optimizer)
    vars(optimizer)["_mtl_routed"] = True
    return optimizer


def route_class(cls: type) -> None:
    """The same routing as :func:`route_optimizer`, on a ``LightningOptimizer`` subclass (the
    class Lightning creates for each wrapper). For the engine: ``BalancedOptimizer``'s
    ``__init_subclass__`` can call it for a class whose MRO holds ``LightningOptimizer``, so
    that ``opt.backward`` on Lightning's wrapper is routed even without
    :class:`BalancedLightningModule`."""
    for name, function in _ROUTED.items():
        setattr(cls, name, function)


# ---------------------------------------------------------------------- the mixin
class BalancedLightningModule:
    """Mixin for a ``LightningModule`` trained with a :class:`~mtl.BalancedOptimizer`.

    ``class Model(BalancedLightningModule, L.LightningModule)`` (this class first):

    * sets ``automatic_optimization = False`` after ``LightningModule.__init__``;
    * ``self.optimizers()`` returns Lightning's wrappers routed by :func:`route_optimizer`:
      ``opt.backward(losses, representation=z)`` goes through the strategy (DDP all-reduces
      the gradients), ``opt.step()`` through Lightning (precision plugin, step counting,
      ``on_before_optimizer_step``) after checking that no balanced backward bypassed the
      strategy under DDP (``RuntimeError`` naming the fix otherwise);
    * :meth:`balanced_backward`: the same routed backward without fetching the optimizer.

    Checkpoints hold the balancer state (Lightning saves ``BalancedOptimizer.state_dict()``,
    which includes it, and restores it on ``fit(ckpt_path=...)``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = [c.__name__ for c in cls.__mro__]
        if "LightningModule" in names and names.index("LightningModule") < names.index(
            "BalancedLightningModule"
        ):
            raise TypeError(
                f"{cls.__name__}: put BalancedLightningModule before LightningModule in the "
                "bases, e.g. class Model(BalancedLightningModule, L.LightningModule)"
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """``LightningModule.optimizers``, with every wrapper of a BalancedOptimizer routed
        (:func:`route_optimizer`)."""
        lightning_module: Any = super()
        opts = lightning_module.optimizers(use_pl_optimizer)
        if use_pl_optimizer:
            for opt in opts if isinstance(opts, list) else [opts]:
                route_optimizer(opt)
        return opts

    def balanced_backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
        shared_parameters: Iterable[Tensor] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> BalanceInfo:
        """The balanced backward of ``optimizer`` (default: the module's only optimizer),
        routed through the strategy (:func:`balanced_manual_backward`)."""
        if optimizer is None:
            opts = self.optimizers()
            if isinstance(opts, list):
                raise ValueError(
                    f"{type(self).__name__} has {len(opts)} optimizers: pass optimizer="
                )
            optimizer = opts
        return balanced_manual_backward(
            self,
            optimizer,
            losses,
            representation=representation,
            shared_parameters=shared_parameters,
            **kwargs,
        )
