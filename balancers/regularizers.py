"""Perturbation regularizers SCR and LSPR: loss terms that compose with every balancer.

**Placeholder design [R].** Ramazanli et al., *Beyond Self-Consistency: Loss-Balanced
Perturbation-Based Regularization Improves Industrial-Scale Ads Ranking* (arXiv 2502.18478)
introduce SCR (self-consistency regularization) and LSPR (loss-balanced small perturbation
regularization), but only the abstract and a summary were available. What is perturbed, the
perturbation law and size, SCR's divergence, LSPR's loss and what "loss-balanced" balances are
NOT known: every formula below is a documented developer decision (tag [R] in
``reference/methods.md`` §5.B), never the paper's method. See ``docs/methods.md (SCR and LSPR)``.

These classes are not optimizers. They PRODUCE the K per-task losses, which then go into
``opt.backward(losses, representation=...)`` of any balancer (or a plain
``sum(losses).backward()``)::

    reg = LSPR(epsilon=1e-2, rho=0.5)             # or SCR(epsilon=1e-2, weight=1.0)
    out = model(x)
    losses = reg(out.representation, heads, targets, ["binary", "binary"],
                 outputs=out.task_outputs)
    info = opt.backward(losses, representation=out.representation)

``heads`` maps a representation to the K task outputs (the part of the model above the
perturbation); the perturbed branch ``z~ = z + noise`` is a function of ``z``, so the gradient
``h_k = dL_k/dz`` the balancer sees includes both branches. Cost: one extra forward of ``heads``
(and its backward) per step. For balancers that re-evaluate the losses at a shifted point
(MARIGOLD's ``estimator="fd"``), ``reg.closure(heads, targets, loss_fns)`` replays the same
noise.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LSPR",
    "SCR",
    "PerturbationRegularizer",
    "consistency_divergence",
    "draw_noise",
    "lspr_auto_ratio",
    "noise_scale",
    "perturb",
    "symmetric_bernoulli_kl",
    "task_loss",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
LossSpec = str | LossFn
Representation = Tensor | Sequence[Tensor]
Heads = Callable[[Any], Any]

KINDS: tuple[str, ...] = ("binary", "regression")
NOISES: tuple[str, ...] = ("gaussian", "uniform")
DIVERGENCES: tuple[str, ...] = ("auto", "kl", "mse")
_SQRT3 = math.sqrt(3.0)


# ---------------------------------------------------------------------------- option checks
def _check_real(name: str, value: object, *, low: float, high: float | None = None) -> float:
    """``value`` as a float in ``[low, high]`` (finite); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and v > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return v


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


# ---------------------------------------------------------------------------- pure functions
def noise_scale(z: Tensor, epsilon: float, relative: bool = True) -> Tensor | float:
    """The per-entry noise standard deviation ``s`` in ``z~ = z + s * xi``  [R].

    * ``relative=False``: ``s = epsilon`` (a float).
    * ``relative=True``: ``s_j = epsilon * sigma_j`` with
      ``sigma_j = sqrt(mean_b (z[b, j] - mean_b z[b, j])^2)``, the population standard deviation
      of feature ``j`` over the batch dimension 0 (every index of the non-batch dimensions is a
      feature), computed in float64 on ``z.detach()`` (no gradient flows through ``s``) and
      cast to ``z.dtype``; shape ``(1, *z.shape[1:])``. A constant feature (or a batch of one
      example) gets no noise.
    """
    if not relative:
        return epsilon
    if z.dim() == 0:
        raise ValueError("relative=True needs a tensor with a batch dimension, got a 0-d tensor")
    sigma = z.detach().to(torch.float64).std(dim=0, correction=0, keepdim=True)
    return (epsilon * sigma).to(z.dtype)


def draw_noise(
    shape: Sequence[int] | torch.Size,
    *,
    noise: str = "gaussian",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Unit-variance noise ``xi`` of ``shape`` [R].

    ``"gaussian"``: ``xi ~ N(0, I)``; ``"uniform"``: ``xi = sqrt(3) * (2u - 1)``,
    ``u ~ U[0, 1)``, i.e. uniform on ``[-sqrt(3), sqrt(3))`` with unit variance, so ``epsilon``
    is the noise standard deviation for both laws. Drawn on the generator's device (in float64
    for a float64 ``dtype``, float32 otherwise), then moved to ``device``/``dtype``.
    """
    _check_choice("noise", noise, NOISES)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if noise == "gaussian":
        xi = torch.randn(tuple(shape), generator=generator, dtype=draw_dtype, device=gen_device)
    else:
        u = torch.rand(tuple(shape), generator=generator, dtype=draw_dtype, device=gen_device)
        xi = u.mul_(2.0).sub_(1.0).mul_(_SQRT3)
    return xi.to(device=device if device is not None else gen_device, dtype=dtype)


def perturb(
    z: Tensor,
    epsilon: float,
    *,
    relative: bool = True,
    noise: str = "gaussian",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``z~ = z + s * xi`` with ``s = noise_scale(z, epsilon, relative)`` and ``xi`` from
    :func:`draw_noise` [R].

    ``s`` and ``xi`` carry no gradient, so ``dz~/dz = I``: everything computed from ``z~`` sends
    its gradient back through ``z``. ``generator=None`` uses torch's global RNG.
    """
    if not z.is_floating_point():
        raise ValueError(f"can only perturb a floating-point tensor, got dtype {z.dtype}")
    scale = noise_scale(z, epsilon, relative)
    xi = draw_noise(z.shape, noise=noise, generator=generator, dtype=z.dtype, device=z.device)
    return z + scale * xi


def symmetric_bernoulli_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean symmetric KL between Bernoulli(sigmoid(a)) and Bernoulli(sigmoid(b)) [R].

    ``KL(p||q) + KL(q||p) = (p - q) * (a - b)`` with ``p = sigmoid(a)``, ``q = sigmoid(b)``
    (exact identity; no logarithm, so it is finite for any finite logits), averaged over all
    elements. Non-negative, symmetric, zero iff ``a == b``.
    """
    p = torch.sigmoid(logits_p)
    q = torch.sigmoid(logits_q)
    return ((p - q) * (logits_p - logits_q)).mean()


def consistency_divergence(clean: Tensor, perturbed: Tensor, divergence: str) -> Tensor:
    """SCR's ``D(f(z), f(z~))`` [R]: ``"kl"`` = :func:`symmetric_bernoulli_kl` of the logits,
    ``"mse"`` = ``mean((f(z) - f(z~))^2)`` (for regression outputs, or on logits)."""
    if divergence == "kl":
        return symmetric_bernoulli_kl(clean, perturbed)
    if divergence == "mse":
        return (clean - perturbed).square().mean()
    raise ValueError(f"unknown divergence {divergence!r}; expected 'kl' or 'mse'")


def lspr_auto_ratio(clean: Tensor, perturbed: Tensor, max_ratio: float = 10.0) -> Tensor:
    """LSPR's ``c = clamp(sg(L_clean) / sg(L_pert), 0, max_ratio)`` [R] (detached).

    ``L_pert = 0`` gives ``max_ratio`` (``1`` when ``L_clean = 0`` too); a negative ratio (losses
    are expected to be non-negative) gives ``0``. NaN propagates.
    """
    lc = clean.detach()
    lp = perturbed.detach()
    one = torch.ones_like(lc)
    safe = torch.where(lp > 0, lp, one)
    fallback = torch.where(lc > 0, one * max_ratio, one)
    ratio = torch.where(lp > 0, lc / safe, fallback)
    return torch.where(torch.isnan(ratio), ratio, ratio.clamp(0.0, max_ratio))


def task_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """Built-in task losses (mean over the batch): ``"binary"`` =
    ``binary_cross_entropy_with_logits``, ``"regression"`` = ``mse_loss``.

    The target is cast to the output's dtype and reshaped to its shape when the number of
    elements agrees (``(B, 1)`` vs ``(B,)``).
    """
    target = _match_target(output, target)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(output, target)
    if kind == "regression":
        return F.mse_loss(output, target)
    raise ValueError(f"unknown task kind {kind!r}; expected one of {list(KINDS)}")


def _match_target(output: Tensor, target: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        target = torch.as_tensor(target, device=output.device)
    if target.shape != output.shape:
        if target.numel() != output.numel():
            raise ValueError(
                f"target of shape {tuple(target.shape)} does not match the output of shape "
                f"{tuple(output.shape)}"
            )
        target = target.reshape(output.shape)
    return target.to(output.dtype)


def _infer_kind(fn: object) -> str | None:
    """The kind of a well-known loss callable, else ``None``."""
    if fn is F.binary_cross_entropy_with_logits or isinstance(fn, nn.BCEWithLogitsLoss):
        return "binary"
    if fn is F.mse_loss or isinstance(fn, nn.MSELoss):
        return "regression"
    return None


# ---------------------------------------------------------------------------- base class
class PerturbationRegularizer:
    """Common part of :class:`SCR` and :class:`LSPR`: options, noise, generator, task losses.

    Subclasses implement :meth:`_combine` (the regularized loss of every task) and
    :meth:`_strength`.

    Args:
        epsilon: noise size ``epsilon >= 0`` (default ``1e-2``); ``0`` switches the regularizer
            off.
        relative: ``True`` (default): noise std ``epsilon * sigma_j`` relative to the batch std
            of each feature (see :func:`noise_scale`); ``False``: absolute std ``epsilon``.
        noise: ``"gaussian"`` (default) or ``"uniform"`` (unit variance; see
            :func:`draw_noise`).
        seed: seed of the regularizer's own ``torch.Generator`` (default 0). The global RNG is
            never touched; the generator's state is saved by :meth:`state_dict`.
        device: device of the generator (default ``"cpu"``); noise drawn there is moved to the
            representation's device. Pass the representation's device (e.g. ``"cuda"``) to
            draw it in place. Under DDP give each rank its own seed (e.g. ``seed + rank``),
            otherwise every rank draws the same noise.
    """

    #: training loops (mtl.train.fit) recognise LSPR/SCR-style regularizers by this class flag
    perturbs_representation: ClassVar[bool] = True

    def __init__(
        self,
        epsilon: float = 1e-2,
        *,
        relative: bool = True,
        noise: Literal["gaussian", "uniform"] = "gaussian",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.epsilon = epsilon
        self.relative = _check_bool("relative", relative)
        self.noise = _check_choice("noise", noise, NOISES)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed: int = int(seed)
        try:
            self._generator: torch.Generator = torch.Generator(device=device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"cannot create a torch.Generator on device {device!r}: {err}"
            ) from err
        self._generator.manual_seed(self.seed)
        #: number of noise draws so far (one per perturbed tensor)
        self.num_draws: int = 0
        #: detached diagnostics of the last call (see the subclass docstrings)
        self.last: dict[str, Tensor] = {}
        self._replay_state: dict[str, Any] | None = None

    # -- options
    @property
    def epsilon(self) -> float:
        """Noise size (``>= 0``); may be changed between steps (e.g. a schedule)."""
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = _check_real("epsilon", value, low=0.0)

    @property
    def generator(self) -> torch.Generator:
        """The regularizer's own random-number generator."""
        return self._generator

    def _strength(self) -> float:
        raise NotImplementedError

    @property
    def active(self) -> bool:
        """Whether a call perturbs anything (``epsilon > 0`` and a non-zero strength)."""
        return self.epsilon > 0.0 and self._strength() > 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_options()})"

    def _repr_options(self) -> str:
        return (
            f"epsilon={self.epsilon!r}, relative={self.relative}, noise={self.noise!r}, "
            f"seed={self.seed}"
        )

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The generator state (for an exact resume), the seed and the draw counter."""
        return {
            "type": type(self).__name__,
            "seed": self.seed,
            "num_draws": self.num_draws,
            "generator_device": str(self._generator.device),
            "generator": self._generator.get_state().clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next noise draw continues the stream."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"type", "seed", "num_draws", "generator"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks the entries {sorted(missing)}")
        if state_dict["type"] != type(self).__name__:
            raise ValueError(
                f"state_dict was saved by {state_dict['type']}, cannot load into "
                f"{type(self).__name__}"
            )
        saved = torch.device(state_dict.get("generator_device", "cpu")).type
        if saved != self._generator.device.type:
            raise ValueError(
                f"state_dict holds a {saved} generator state but this regularizer's generator is "
                f"on {self._generator.device}"
            )
        state = state_dict["generator"]
        if not isinstance(state, Tensor):
            raise TypeError("state_dict['generator'] must be a ByteTensor")
        self._generator.set_state(state.detach().to("cpu", torch.uint8).clone())
        self.seed = int(state_dict["seed"])
        self.num_draws = int(state_dict["num_draws"])

    # -- noise
    def perturb(self, representation: Representation) -> Any:
        """``z~ = z + s * xi`` (see :func:`perturb`), noise from the regularizer's generator.

        A tuple/list of tensors (blocks) is perturbed block by block, each with its own scale,
        and returned as the same container type. Advances the generator; does not change what
        :meth:`replay` reuses.
        """
        self._check_representation(representation)
        noise = self._draw(representation)
        return _add(representation, noise)

    def _draw(self, representation: Representation) -> list[Tensor]:
        """The additive noise ``s * xi`` of every block (detached), one generator draw each."""
        blocks = [representation] if isinstance(representation, Tensor) else representation
        out = []
        for z in blocks:
            scale = noise_scale(z, self.epsilon, self.relative)
            xi = draw_noise(
                z.shape, noise=self.noise, generator=self._generator, dtype=z.dtype, device=z.device
            )
            out.append(scale * xi)
            self.num_draws += 1
        return out

    # -- the losses
    def __call__(
        self,
        representation: Representation,
        heads: Heads,
        targets: Sequence[Tensor],
        loss_fns: Sequence[LossSpec],
        *,
        outputs: Sequence[Tensor] | None = None,
        kinds: Sequence[str | None] | None = None,
    ) -> list[Tensor]:
        """The K regularized task losses, ready for ``opt.backward(losses, representation=...)``.

        Args:
            representation: the perturbed tensor ``z`` (the balance point by default; or the
                input embeddings, with ``heads`` mapping embeddings to outputs), or a
                tuple/list of tensors (blocks).
            heads: callable mapping a representation (same structure as ``representation``) to
                the K task outputs: a sequence of K tensors, or an object with a
                ``task_outputs`` attribute (e.g. a ``ModelOutput``).
            targets: K target tensors (one per task; float labels in {0, 1} for binary tasks).
            loss_fns: K task losses, each ``"binary"`` (BCE with logits, mean), ``"regression"``
                (MSE, mean) or a callable ``loss_fn(output, target) -> scalar tensor``.
            outputs: the clean outputs ``f_k(z)`` when they are already computed (e.g.
                ``out.task_outputs`` of the model forward); ``None``: computed as
                ``heads(representation)`` (one more forward of the heads).
            kinds: optional K kinds (``"binary"``/``"regression"``/``None``) for callables
                whose kind cannot be inferred (SCR's ``divergence="auto"`` needs it; the
                functional and module forms of BCE-with-logits and MSE are recognised).

        Returns:
            a list of K scalar loss tensors. When :attr:`active` is false (``epsilon = 0`` or a
            zero strength) they are exactly the clean task losses: no noise is drawn and no
            extra forward runs, so training is bit-identical to training without regularizer.
            The noise (and LSPR's ``"auto"`` ratios) of this call are kept for :meth:`replay`.
        """
        losses, diagnostics, state = self._evaluate(
            representation, heads, targets, loss_fns, outputs, kinds, replay=None
        )
        self.last = diagnostics
        self._replay_state = state
        return losses

    def replay(
        self,
        representation: Representation,
        heads: Heads,
        targets: Sequence[Tensor],
        loss_fns: Sequence[LossSpec],
        *,
        outputs: Sequence[Tensor] | None = None,
        kinds: Sequence[str | None] | None = None,
    ) -> list[Tensor]:
        """The regularized losses at ``representation`` with the noise of the last call.

        Re-evaluates the same loss function as the last :meth:`__call__` -- the same additive
        noise ``s * xi`` (not redrawn, its scale not recomputed) and, for ``LSPR(rho="auto")``,
        the same ratios ``c_k`` -- at another point, e.g. a shifted representation: what a
        finite-difference balancer's closure needs (MARIGOLD's ``estimator="fd"``). At the
        representation of the last call it returns bit-identical values. Draws no noise; does
        not update :attr:`last`.
        """
        if self._replay_state is None:
            raise RuntimeError("replay() needs a previous call of the regularizer")
        losses, _, _ = self._evaluate(
            representation, heads, targets, loss_fns, outputs, kinds, replay=self._replay_state
        )
        return losses

    def closure(
        self,
        heads: Heads,
        targets: Sequence[Tensor],
        loss_fns: Sequence[LossSpec],
        *,
        kinds: Sequence[str | None] | None = None,
    ) -> Callable[[Any], list[Tensor]]:
        """``lambda z: self.replay(z, heads, targets, loss_fns)``: a representation-level closure.

        For balancers that evaluate the losses at a shifted representation, e.g.
        ``opt.backward(losses, representation=z, closure=reg.closure(heads, ys, loss_fns))``
        with ``MARIGOLD(estimator="fd")``.
        """

        def evaluate(representation: Any) -> list[Tensor]:
            return self.replay(representation, heads, targets, loss_fns, kinds=kinds)

        return evaluate

    def _evaluate(
        self,
        representation: Representation,
        heads: Heads,
        targets: Sequence[Tensor],
        loss_fns: Sequence[LossSpec],
        outputs: Sequence[Tensor] | None,
        kinds: Sequence[str | None] | None,
        replay: dict[str, Any] | None,
    ) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Any]]:
        if not callable(heads):
            raise TypeError(f"heads must be callable, got {type(heads).__name__}")
        if isinstance(loss_fns, (str, bytes)) or not isinstance(loss_fns, Sequence):
            raise TypeError("loss_fns must be a sequence of K loss specifications")
        k_tasks = len(loss_fns)
        if k_tasks == 0:
            raise ValueError("loss_fns is empty")
        if isinstance(targets, Tensor) or not isinstance(targets, Sequence):
            raise TypeError("targets must be a sequence of K tensors (one per task)")
        if len(targets) != k_tasks:
            raise ValueError(f"got {len(targets)} targets for {k_tasks} tasks")
        self._check_representation(representation)
        fns, task_kinds = self._resolve_tasks(loss_fns, kinds)
        clean_out = self._outputs(
            heads(representation) if outputs is None else outputs, k_tasks, "outputs"
        )
        clean = [self._loss(k, fns[k], clean_out[k], targets[k]) for k in range(k_tasks)]
        if replay is None:
            # inactive (epsilon = 0 or zero strength): the clean losses, no extra forward
            noise = self._draw(representation) if self.active else None
            frozen: dict[str, Any] | None = None
        else:
            noise, frozen = replay["noise"], replay["frozen"]
        if noise is None:
            diagnostics = {"clean": _stack(clean), "total": _stack(clean)}
            return clean, diagnostics, {"noise": None, "frozen": {}}
        pert_in = _add(representation, noise)
        pert_out = self._outputs(heads(pert_in), k_tasks, "heads(z~)")
        losses, diagnostics, frozen = self._combine(
            clean, clean_out, pert_out, targets, fns, task_kinds, frozen
        )
        diagnostics["clean"] = _stack(clean)
        diagnostics["total"] = _stack(losses)
        return losses, diagnostics, {"noise": noise, "frozen": frozen}

    def _combine(
        self,
        clean: list[Tensor],
        clean_out: list[Tensor],
        pert_out: list[Tensor],
        targets: Sequence[Tensor],
        fns: list[LossFn],
        kinds: list[str | None],
        frozen: dict[str, Any] | None,
    ) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Any]]:
        """(losses, diagnostics, constants to freeze for :meth:`replay`); ``frozen`` given when
        replaying."""
        raise NotImplementedError

    # -- helpers
    @staticmethod
    def _check_representation(representation: Representation) -> None:
        blocks = [representation] if isinstance(representation, Tensor) else representation
        if not isinstance(blocks, (list, tuple)) or len(blocks) == 0:
            raise TypeError(
                "representation must be a tensor or a non-empty tuple/list of tensors, got "
                f"{type(representation).__name__}"
            )
        for b, z in enumerate(blocks):
            if not isinstance(z, Tensor):
                raise TypeError(f"representation block {b} is a {type(z).__name__}, not a Tensor")
            if not z.is_floating_point():
                raise ValueError(f"representation must be floating point, got dtype {z.dtype}")

    @staticmethod
    def _outputs(result: Any, k_tasks: int, what: str) -> list[Tensor]:
        result = getattr(result, "task_outputs", result)
        if isinstance(result, Tensor) or not isinstance(result, Sequence):
            raise TypeError(
                f"{what} must be a sequence of {k_tasks} tensors, got {type(result).__name__}"
            )
        items = list(result)
        if len(items) != k_tasks:
            raise ValueError(f"{what} has {len(items)} task outputs, expected {k_tasks}")
        for k, o in enumerate(items):
            if not isinstance(o, Tensor):
                raise TypeError(f"{what}[{k}] is a {type(o).__name__}, not a Tensor")
        return items

    @staticmethod
    def _resolve_tasks(
        loss_fns: Sequence[LossSpec], kinds: Sequence[str | None] | None
    ) -> tuple[list[LossFn], list[str | None]]:
        k_tasks = len(loss_fns)
        if kinds is not None:
            if isinstance(kinds, str) or len(kinds) != k_tasks:
                raise ValueError(f"kinds must be a sequence of {k_tasks} kinds (or None)")
            for k, given_kind in enumerate(kinds):
                if given_kind is not None and given_kind not in KINDS:
                    raise ValueError(
                        f"unknown task kind {given_kind!r} for task {k}; expected one of "
                        f"{list(KINDS)}"
                    )
        fns: list[LossFn] = []
        out_kinds: list[str | None] = []
        for k, spec in enumerate(loss_fns):
            given = None if kinds is None else kinds[k]
            if isinstance(spec, str):
                if spec not in KINDS:
                    raise ValueError(
                        f"unknown loss {spec!r} for task {k}; expected one of {list(KINDS)} "
                        "or a callable"
                    )
                if given is not None and given != spec:
                    raise ValueError(f"task {k}: loss {spec!r} contradicts kind {given!r}")
                kind: str | None = spec
                fns.append(_builtin(spec))
            elif callable(spec):
                kind = given if given is not None else _infer_kind(spec)
                fns.append(spec)
            else:
                raise TypeError(
                    f"loss_fns[{k}] must be 'binary', 'regression' or a callable, got "
                    f"{type(spec).__name__}"
                )
            out_kinds.append(kind)
        return fns, out_kinds

    @staticmethod
    def _loss(k: int, fn: LossFn, output: Tensor, target: Tensor) -> Tensor:
        loss = fn(output, target)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"the loss function of task {k} must return a scalar tensor, got {shape}"
            )
        return loss


def _builtin(kind: str) -> LossFn:
    def fn(output: Tensor, target: Tensor) -> Tensor:
        return task_loss(kind, output, target)

    return fn


def _add(representation: Representation, noise: list[Tensor]) -> Any:
    """``z + n`` block by block, keeping the container type (tensor, tuple or list)."""
    if isinstance(representation, Tensor):
        if len(noise) != 1 or noise[0].shape != representation.shape:
            raise ValueError(_replay_mismatch(representation, noise))
        return representation + noise[0]
    blocks = list(representation)
    if len(blocks) != len(noise) or any(z.shape != n.shape for z, n in zip(blocks, noise)):
        raise ValueError(_replay_mismatch(representation, noise))
    perturbed = [z + n for z, n in zip(blocks, noise)]
    return tuple(perturbed) if isinstance(representation, tuple) else perturbed


def _replay_mismatch(representation: Representation, noise: list[Tensor]) -> str:
    got = (
        [tuple(representation.shape)]
        if isinstance(representation, Tensor)
        else [tuple(z.shape) for z in representation]
    )
    return (
        f"the representation (shapes {got}) does not match the noise of the last call "
        f"(shapes {[tuple(n.shape) for n in noise]})"
    )


def _stack(values: list[Tensor]) -> Tensor:
    return torch.stack([v.detach().to(torch.float64) for v in values])


# ---------------------------------------------------------------------------- SCR
class SCR(PerturbationRegularizer):
    """Self-consistency regularization: penalise disagreement between clean and perturbed outputs.

    Placeholder design [R] (the paper's loss was not available; ``reference/methods.md`` §5.B)::

        z~   = z + s * xi                                    (see PerturbationRegularizer)
        L_k  = task_loss_k(f_k(z), y_k) + weight * D_k(f_k(z), f_k(z~))
        D_k  = (p - q)(a - b),  p = sigmoid(a), q = sigmoid(b)   binary: symmetric Bernoulli KL
             = mean((a - b)^2)                                   regression: MSE
        (a = f_k(z), b = f_k(z~); D averaged over the batch)

    With ``stop_grad_clean=True`` the clean branch enters ``D`` detached (``a -> sg(a)``): the
    consistency term then only moves the perturbed prediction toward the clean one. The task
    loss is never applied to the perturbed outputs (no labels are used on ``z~``).

    Args:
        epsilon, relative, noise, seed, device: see :class:`PerturbationRegularizer`.
        weight: ``lambda_c >= 0`` (default 1.0); ``0`` switches the regularizer off.
        divergence: ``"auto"`` (default: symmetric Bernoulli KL for binary tasks, MSE for
            regression), ``"kl"`` (KL for every task; outputs must be logits) or ``"mse"``
            (MSE for every task, on logits for binary tasks).
        stop_grad_clean: detach the clean branch inside ``D`` (default ``False``).

    ``last`` (detached, float64, ``(K,)``): ``clean`` task losses, ``consistency`` ``D_k`` and
    ``total`` returned losses.
    """

    def __init__(
        self,
        epsilon: float = 1e-2,
        *,
        weight: float = 1.0,
        divergence: Literal["auto", "kl", "mse"] = "auto",
        stop_grad_clean: bool = False,
        relative: bool = True,
        noise: Literal["gaussian", "uniform"] = "gaussian",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.weight = weight
        self.divergence = _check_choice("divergence", divergence, DIVERGENCES)
        self.stop_grad_clean = _check_bool("stop_grad_clean", stop_grad_clean)
        super().__init__(epsilon, relative=relative, noise=noise, seed=seed, device=device)

    @property
    def weight(self) -> float:
        """``lambda_c``, the consistency weight (``>= 0``)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = _check_real("weight", value, low=0.0)

    def _strength(self) -> float:
        return self.weight

    def _repr_options(self) -> str:
        return (
            f"weight={self.weight!r}, divergence={self.divergence!r}, "
            f"stop_grad_clean={self.stop_grad_clean}, {super()._repr_options()}"
        )

    def _divergence_of(self, k: int, kind: str | None) -> str:
        if self.divergence == "mse":
            return "mse"
        if self.divergence == "kl":
            if kind == "regression":
                raise ValueError(
                    f"divergence='kl' needs logits, but task {k} is a regression task; use "
                    "divergence='auto' or 'mse'"
                )
            return "kl"
        if kind is None:
            raise ValueError(
                f"divergence='auto' needs the kind of task {k}: pass loss 'binary'/'regression', "
                "kinds=[...], or choose divergence='kl'/'mse'"
            )
        return "kl" if kind == "binary" else "mse"

    def _combine(
        self,
        clean: list[Tensor],
        clean_out: list[Tensor],
        pert_out: list[Tensor],
        targets: Sequence[Tensor],
        fns: list[LossFn],
        kinds: list[str | None],
        frozen: dict[str, Any] | None,
    ) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Any]]:
        divs = [self._divergence_of(k, kind) for k, kind in enumerate(kinds)]
        terms = []
        for a, b, div in zip(clean_out, pert_out, divs):
            if b.shape != a.shape:
                raise ValueError(
                    f"perturbed output shape {tuple(b.shape)} differs from the clean output "
                    f"shape {tuple(a.shape)}"
                )
            terms.append(consistency_divergence(a.detach() if self.stop_grad_clean else a, b, div))
        w = self.weight
        losses = [c + w * d for c, d in zip(clean, terms)]
        return losses, {"consistency": _stack(terms)}, {}


# ---------------------------------------------------------------------------- LSPR
class LSPR(PerturbationRegularizer):
    """Loss-balanced small perturbation regularization: train the perturbed copy on the labels.

    Placeholder design [R] (the paper's loss was not available; ``reference/methods.md`` §5.B)::

        z~      = z + s * xi                                  (see PerturbationRegularizer)
        Lc_k    = task_loss_k(f_k(z), y_k),   Lp_k = task_loss_k(f_k(z~), y_k)
        fixed:  L_k = (1 - rho) * Lc_k + rho * Lp_k           (rho in [0, 1])
        "auto": c_k = clamp(sg(Lc_k) / sg(Lp_k), 0, max_ratio)
                L_k = 1/2 * (Lc_k + c_k * Lp_k)

    ``"auto"`` makes the perturbed term's magnitude equal to the clean one's (``c_k Lp_k =
    Lc_k`` unless clamped), so ``L_k`` has the value ``Lc_k``: the total loss scale is unchanged.
    Equivalently ``L_k = s_t [(1 - rho_t) Lc_k + rho_t Lp_k]`` with the per-step, per-task
    ``rho_t = Lc_k / (Lc_k + Lp_k)`` and ``s_t = (Lc_k + Lp_k) / (2 Lp_k)`` (both detached).
    ``max_ratio`` bounds the up-weighting of a perturbed loss much smaller than the clean one
    (``Lp_k -> 0``).

    Args:
        epsilon, relative, noise, seed, device: see :class:`PerturbationRegularizer`.
        rho: mixing weight in ``[0, 1]`` (default 0.5) or ``"auto"``; ``0`` switches the
            regularizer off, ``1`` trains on the perturbed copy only.
        max_ratio: upper clamp of ``c_k`` for ``rho="auto"`` (default 10.0, > 0).
        weight: alias of ``rho`` (the generic name of DESIGN.md's table); give one of them.

    ``last`` (detached, float64, ``(K,)``): ``clean`` and ``perturbed`` task losses, ``ratio``
    ``c_k`` (``"auto"`` only) and ``total`` returned losses.
    """

    def __init__(
        self,
        epsilon: float = 1e-2,
        *,
        rho: float | Literal["auto"] | None = None,
        max_ratio: float = 10.0,
        relative: bool = True,
        noise: Literal["gaussian", "uniform"] = "gaussian",
        seed: int = 0,
        device: torch.device | str = "cpu",
        weight: float | Literal["auto"] | None = None,
    ) -> None:
        if rho is not None and weight is not None:
            raise ValueError("pass rho= or its alias weight=, not both")
        given = rho if rho is not None else weight
        self.rho = 0.5 if given is None else given
        m = _check_real("max_ratio", max_ratio, low=0.0)
        if m == 0.0:
            raise ValueError("max_ratio must be > 0, got 0")
        self.max_ratio = m
        super().__init__(epsilon, relative=relative, noise=noise, seed=seed, device=device)

    @property
    def rho(self) -> float | str:
        """The mixing weight in ``[0, 1]`` or ``"auto"``."""
        return self._rho

    @rho.setter
    def rho(self, value: float | str) -> None:
        if isinstance(value, str):
            if value != "auto":
                raise ValueError(f"rho must be a number in [0, 1] or 'auto', got {value!r}")
            self._rho: float | str = value
        else:
            self._rho = _check_real("rho", value, low=0.0, high=1.0)

    @property
    def weight(self) -> float | str:
        """Alias of :attr:`rho`."""
        return self.rho

    @weight.setter
    def weight(self, value: float | str) -> None:
        self.rho = value

    def _strength(self) -> float:
        return 1.0 if self.rho == "auto" else float(self.rho)

    def _repr_options(self) -> str:
        return f"rho={self.rho!r}, max_ratio={self.max_ratio!r}, {super()._repr_options()}"

    def _combine(
        self,
        clean: list[Tensor],
        clean_out: list[Tensor],
        pert_out: list[Tensor],
        targets: Sequence[Tensor],
        fns: list[LossFn],
        kinds: list[str | None],
        frozen: dict[str, Any] | None,
    ) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Any]]:
        pert = [self._loss(k, fns[k], pert_out[k], targets[k]) for k in range(len(clean))]
        diagnostics = {"perturbed": _stack(pert)}
        if self.rho == "auto":
            if frozen is not None and "ratio" in frozen:
                ratios = frozen["ratio"]
            else:
                ratios = [lspr_auto_ratio(lc, lp, self.max_ratio) for lc, lp in zip(clean, pert)]
            diagnostics["ratio"] = _stack(ratios)
            losses = [0.5 * (lc + c * lp) for lc, c, lp in zip(clean, ratios, pert)]
            return losses, diagnostics, {"ratio": ratios}
        rho = float(self.rho)
        if rho == 0.0:
            return list(clean), diagnostics, {}
        if rho == 1.0:
            return pert, diagnostics, {}
        return [(1.0 - rho) * lc + rho * lp for lc, lp in zip(clean, pert)], diagnostics, {}
