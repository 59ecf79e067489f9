"""The noise of the perturbation regularizers [R]: its scale, its law and adding it.

``z~ = z + s * xi``: :func:`noise_scale` gives the per-entry standard deviation ``s``
(absolute, or relative to the batch std of each feature), :func:`draw_noise` the unit-variance
``xi`` (Gaussian or uniform), :func:`perturb` both at once; ``_add`` adds an already drawn noise
to a representation block by block (what :meth:`PerturbationRegularizer.replay` reuses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import _check_choice

Representation = Tensor | Sequence[Tensor]

NOISES: tuple[str, ...] = ("gaussian", "uniform")
_SQRT3 = math.sqrt(3.0)


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
