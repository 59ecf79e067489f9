"""The common base of the perturbation regularizers: :class:`PerturbationRegularizer`.

It holds what SCR and LSPR share: the options (``epsilon``, ``relative``, ``noise``), the
regularizer's own seeded ``torch.Generator`` and its checkpointing, the noise draws, the
validation of the call's arguments (representation, heads, targets, task losses), the clean
task losses, and the replay of the last call's noise at another point (``replay``/``closure``).
A subclass only combines the clean and perturbed outputs into the K regularized losses.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ._checks import _check_bool, _check_choice, _check_real
from ._noise import NOISES, Representation, _add, draw_noise, noise_scale
from ._tasks import KINDS, LossFn, LossSpec, _builtin, _infer_kind

Heads = Callable[[Any], Any]


@dataclass(frozen=True)
class PerturbedRun:
    """What a regularizer's :meth:`PerturbationRegularizer._combine` combines, per task: the
    clean losses and outputs, the outputs at the perturbed representation, the targets, the
    loss functions and the task kinds (``"binary"``, ``"regression"`` or ``None``)."""

    clean: list[Tensor]
    clean_out: list[Tensor]
    pert_out: list[Tensor]
    targets: Sequence[Tensor]
    fns: list[LossFn]
    kinds: list[str | None]


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
        run = PerturbedRun(clean, clean_out, pert_out, targets, fns, task_kinds)
        losses, diagnostics, frozen = self._combine(run, frozen)
        diagnostics["clean"] = _stack(clean)
        diagnostics["total"] = _stack(losses)
        return losses, diagnostics, {"noise": noise, "frozen": frozen}

    def _combine(
        self, run: PerturbedRun, frozen: dict[str, Any] | None
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


def _stack(values: list[Tensor]) -> Tensor:
    return torch.stack([v.detach().to(torch.float64) for v in values])
