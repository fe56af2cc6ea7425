"""The one projected sign-gradient loop, shared by the attacks and by TTC's counterattack."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from ..precision import loss_scale


def project(images: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Project a perturbation onto the L-inf ball of radius ``eps`` and keep ``images + delta`` in [0, 1]."""
    return torch.clamp(delta.clamp(-eps, eps), min=-images, max=1 - images)


def sign_step(images: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, step_size: float,
              eps: float) -> torch.Tensor:
    """One ascent step: move by ``step_size`` along the gradient's sign, then project."""
    return project(images, delta.detach() + step_size * grad.sign(), eps)


Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (images, delta, gradient) -> delta


def gradient_steps(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    delta: torch.Tensor,
    steps: int,
    update: Update,
    signs: list[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Ascend ``loss_fn(images + delta)`` by ``steps`` updates ``update(images, delta, gradient)`` (which also
    projects: an attack's own rule, or a sign step in an L-inf ball).

    ``loss_fn`` returns a scalar, summed over the batch, so each image's gradient is its own.
    Yields the perturbation after every step (detached); the caller keeps what it needs. The
    gradient signs are appended to ``signs`` if given, for ``replay_steps``.
    """
    images = images.detach()
    delta = delta.detach()
    for _ in range(steps):
        with torch.enable_grad():
            delta.requires_grad_(True)
            # Under fp16 autocast a small gradient would round to zero and lose its sign.
            loss = loss_fn(images + delta) * loss_scale(images.device)
            (grad,) = torch.autograd.grad(loss, delta)
        if signs is not None:
            signs.append(grad.sign())
        delta = update(images, delta.detach(), grad).detach()
        yield delta


def sign_gradient_steps(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    signs: list[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """``gradient_steps`` with L-inf sign steps of ``step_size`` projected onto the ``eps`` ball and the box."""
    return gradient_steps(loss_fn, images, delta, steps,
                          lambda x, d, g: sign_step(x, d, g, step_size, eps), signs)


def last_of(deltas: Iterable[torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """The last perturbation of a run of steps (``start``, detached, for none); the earlier ones are freed as the
    steps go on."""
    last = deque(deltas, maxlen=1)
    return last[0] if last else start.detach()


def run_steps(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    signs: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The perturbation after all ``steps`` of ``sign_gradient_steps`` (``delta`` itself for none)."""
    return last_of(sign_gradient_steps(loss_fn, images, delta, eps, step_size, steps, signs), delta)


def replay_steps(
    images: torch.Tensor, delta: torch.Tensor, signs: list[torch.Tensor], step_size: float, eps: float
) -> list[torch.Tensor]:
    """The perturbations of recorded steps, as differentiable functions of ``images``.

    A sign has zero derivative, so replaying the recorded signs differentiates the unrolled loop
    exactly: the images enter only through the projections onto the [0, 1] box.
    """
    deltas = []
    for sign in signs:
        delta = project(images, delta + step_size * sign, eps)
        deltas.append(delta)
    return deltas
