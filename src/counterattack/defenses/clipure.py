"""CLIPure-Cos: purification in CLIP's latent space (Zhang, Bi, Chen, Guo, Cheng; ICLR 2025, arXiv 2502.18176).

Specified in ``docs/successors-2026.md``, Part B section 3, after the authors' ``CLIP_eval/CLIPure_Cos.py``
(``TMLResearchGroup-CAS/CLIPure``: ``embed_image``, ``purify_zi``, the blank prompts of ``__init__``). Per image x,
with f the image encoder:

1. Blank-prompt embedding t (once per classifier): the 80 ImageNet templates of OpenAI's CLIP with an empty
   class name ("a bad photo of a .", as the code's ``template.format(c="")`` writes them; open_clip's own list
   is the same 80 strings), each encoded and L2-normalised, then averaged; not normalised again (a cosine
   ignores its norm). The paper writes a single prompt, "a photo of a.": the code is followed.
2. ``z = normalise(f(x))`` in float32.
3. ``steps`` (10) times: ``r = ||z||``; ``g = grad_z[-cos(z, t)]`` by ``autograd.grad`` without
   ``create_graph``, so g is a constant to anything differentiating through the step; ``v = gamma v - (1 -
   gamma) r g / ||r g||``; ``z = r normalise(z / r + step_size v)``. Step size 30, momentum gamma 0, the code's
   L2 mode (its L-inf mode is not used by its runs and not offered).
4. Logits: ``logit_scale * <z, class embedding>``, z not normalised again (the code's head). The class
   embeddings are the run's templates': the code's 80-template ensemble runs on ImageNet only.

As shipped, the method is (almost) the identity, and this reproduces it rather than fixing it:

- The forward pass returns to its start. A step's direction is orthogonal to z inside the plane of z and t,
  and of length step_size, so it turns z towards t by ``arctan(30)`` = 88.09 degrees: past t, then back. An
  embedding within that angle of t, ``cos(z, t) > 1 / sqrt(1 + 30^2)`` = 0.0333 (the spec puts CLIP's images
  at 0.15-0.35; the tiny test CLIP's CIFAR-10 images lie at -0.14 to 0.47), alternates between two points, and
  after 10 (even) steps ``z_10 = z_0``: CLIPure-Cos classifies as plain CLIP (after 9 steps z lies 88 degrees
  from its start, near t). An embedding farther from t first walks towards it by 88.09-degree turns and then
  alternates, so z_10 is not z_0 (176 degrees away from it, for the tiny CLIP's two such trucks of 20 images).
- The input gradient vanishes. With g held constant a step's Jacobian is that of ``u -> normalise(u + s m)``,
  of norm ``1 / sqrt(1 + s^2)`` across the plane's directions, so 10 steps scale the gradient along z's tangent
  space by ``(1 + 30^2)^-5`` = 1.7e-15. The code also differentiates ``r = ||z||``, and its head does not
  normalise again, so the head gradient's component along z crosses the 10 steps undamped and is cancelled only
  by the Jacobian of the first normalisation: exactly in exact arithmetic, up to float32 rounding in practice.
  On the tiny CLIP (10 CIFAR-10 images) the gradient through ``exact`` in float32 is 2e-10 to 7e-8 of CLIP's; its
  direction is that residue's (mostly +-grad ||f(x)||, not CLIP's loss gradient). Under fp16 (the code's
  encoder runs in fp16) the gradient reaching the encoder's fp16 output is cast to fp16 and flushes to exactly
  zero, so gradient attacks stand still and "robust accuracy" equals clean accuracy. (Under fp16 autocast on a
  CPU this holds at unit loss scale, as AutoAttack back-propagates; the project's signed-gradient loop scales its
  loss by 2^12 under fp16, which lifts part of the residue back into fp16's range: signs of rounding residue.)
- ``bpda`` takes the purification as the identity (``z_10`` forward, ``z_0``'s gradient backward), which
  hands an attack CLIP's own gradient: the attack CLIPure-Cos has to be measured with.

The code normalises the step by the Frobenius norm of the whole batch's gradients, so an image's purification
depends on the other images of its batch (the code's default batch holds 2). Here the norm is per image, which
equals the code at batch size 1, where the forward pass is an exact round trip.

--precision paper runs it under fp16 autocast (the registry's default): the code casts the encoder's weights to
fp16 (``model_dtype_half``: all but LayerNorms and embeddings), which autocast imitates op by op; the
purification and the head stay in float32, as in the code. The blank prompts are encoded in float32 here (the
code: in its fp16 text tower).

Cost per image: 1 image-encoder forward, 0 backwards (the latent steps differentiate a d-dimensional vector, not
the encoder); the text encoder runs once per classifier for the 80 blank prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..precision import full_precision
from ..randomness import ImageRandomness
from .base import ADAPTIVE_METHODS, AttackView, DefenseOutput, feature_angle, option, register_defense

# The code fills each template's class slot with "": "a bad photo of a .", the space before the full stop kept.
BLANK_PROMPTS: tuple[str, ...] = tuple(template("") for template in OPENAI_IMAGENET_TEMPLATES)


def blank_prompt_embedding(classifier: ZeroShotClassifier) -> torch.Tensor:
    """t: the mean of the blank prompts' L2-normalised text embeddings, (d,), once per classifier."""

    def build() -> torch.Tensor:
        # In float32 whatever region the first image arrives in, so that t does not depend on the first caller.
        with full_precision(classifier.text_embeddings.device):
            return classifier.encode_texts(BLANK_PROMPTS).mean(dim=0)

    return classifier.text_side(("clipure", "blank prompt embedding"), build)


def purify(embeddings: torch.Tensor, blank: torch.Tensor, steps: int, step_size: float,
           momentum: float = 0.0) -> torch.Tensor:
    """The code's ``purify_zi`` in L2 mode, with each image's step normalised by its own gradient's norm.

    ``embeddings`` (n, d): a detached tensor is purified from scratch; one that carries a graph keeps it, and the
    result is differentiable the way the code's is (each step's gradient g a constant, ``r = ||z||`` not).
    """
    with torch.enable_grad(), full_precision(embeddings.device):
        z = embeddings if embeddings.requires_grad else embeddings.detach().requires_grad_(True)
        target = blank.to(z.dtype).expand_as(z)
        velocity = torch.zeros_like(z)
        for _ in range(steps):
            r = torch.norm(z, dim=1, keepdim=True)
            u = z / r
            loss = -F.cosine_similarity(z, target, dim=1)
            # No create_graph, as the code: g enters the step as a constant, which is what masks the gradient.
            (g,) = torch.autograd.grad(loss, z, torch.ones_like(loss), retain_graph=True)
            g_u = r * g
            # The code divides by torch.norm(g_u), the Frobenius norm over its batch; per image here.
            velocity = momentum * velocity - (1 - momentum) * g_u / torch.norm(g_u, dim=1, keepdim=True)
            u = u + step_size * velocity
            u = u / torch.norm(u, dim=1, keepdim=True)
            z = r * u
    return z


def purified_logits(classifier: ZeroShotClassifier, purified: torch.Tensor) -> torch.Tensor:
    """The code's head: ``(z @ class embeddings) * logit_scale``, z used as it is (its norm is r = 1)."""
    with full_precision(purified.device):
        logits = (purified.float() @ classifier.text_embeddings.T) * classifier.logit_scale
    return logits + classifier.logit_bias if classifier.logit_bias else logits


@register_defense
@dataclass(frozen=True)
class CLIPure:
    """CLIPure-Cos, Zhang et al., ICLR 2025: 10 latent steps of 30 towards the blank-prompt embedding (1 forward).

    As shipped it classifies like plain CLIP and masks its gradient (module docstring); attack it with ``bpda``.

    Example::

        clipure = CLIPure()
        output = clipure(classifier, images, ImageRandomness.from_seed(0, len(images), "clipure"))
    """

    # The code casts the encoder's weights to fp16; fp16 autocast is the project's nearest precision, and it
    # reproduces what matters here, the float32 gradient flushed to zero where it is cast to fp16.
    paper_precision: ClassVar[str] = "fp16"

    steps: int = option(10, "latent purification steps")
    step_size: float = option(30.0, "step size of each latent step, on the unit sphere")
    momentum: float = option(0.0, "momentum gamma of the latent steps (the code's runs: 0)", high=1.0)

    def embed(self, classifier: ZeroShotClassifier, images: torch.Tensor) -> torch.Tensor:
        """``normalise(f(x))`` in float32: the code's ``embed_image`` (f in the ambient precision, then cast)."""
        return F.normalize(classifier.encode_image(images).float(), dim=-1)

    def purify(self, classifier: ZeroShotClassifier, embeddings: torch.Tensor) -> torch.Tensor:
        return purify(embeddings, blank_prompt_embedding(classifier), self.steps, self.step_size, self.momentum)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = check_pixels(images).detach().float()
        start = self.embed(classifier, x)
        purified = self.purify(classifier, start).detach()
        return DefenseOutput(logits=purified_logits(classifier, purified), feature_shift=feature_angle(purified, start))

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """exact: the code's own backward (each step's gradient a constant), about 1e-8 of CLIP's gradient in float32
        and 0 under fp16; bpda: the purification as the identity, CLIP's gradient."""
        if method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown adaptive method {method!r}; one of {ADAPTIVE_METHODS}")
        start = self.embed(classifier, check_pixels(images))
        if method == "exact":
            return AttackView(purified_logits(classifier, self.purify(classifier, start)))
        # Straight-through: z_10 forward, bit for bit (start - start.detach() is exactly 0); z_0's gradient back.
        purified = self.purify(classifier, start.detach()).detach()
        return AttackView(purified_logits(classifier, purified + (start - start.detach())))
