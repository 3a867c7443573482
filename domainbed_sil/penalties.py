"""Pure functions for the invariance penalties of SIL, IRMv1 and V-REx.

Every function here is side-effect free: it takes tensors and returns tensors that stay
in the autograd graph, so an algorithm can add ``lambda * penalty`` to its objective and
back-propagate through it.  Shapes are stated per argument; ``N`` is a batch size and
``E`` a number of environments.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

VARIANCE_CONVENTIONS = ("unbiased", "population", "pairwise")


def classification_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-environment risk: BCE-with-logits for one logit, cross-entropy otherwise.

    Args:
        logits: ``(N, 1)`` for binary tasks (Colored MNIST) or ``(N, C)``.
        y: ``(N,)`` labels; 0/1 (any dtype) for binary, class indices (long) otherwise.
        reduction: ``"mean"`` (protocol default) or ``"sum"`` over the N samples.
    Returns:
        A scalar (nats).
    """
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, y.long(), reduction=reduction)


def correct_predictions(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean ``(N,)``: prediction equals label (``logit > 0`` for a single logit)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(y.dtype) == y
    return logits.argmax(dim=1) == y


def variance(values: torch.Tensor, convention: str = "unbiased") -> torch.Tensor:
    """Spread of ``E`` scalar per-environment values, ``values`` of shape ``(E,)``.

    Conventions:
        ``unbiased``   sum((v - mean)^2) / (E - 1)          (torch's default ``var``)
        ``population`` sum((v - mean)^2) / E                (numpy's default, DomainBed's V-REx)
        ``pairwise``   mean over pairs i<j of (v_i - v_j)^2 = 2 x unbiased; for two
                       environments exactly (v_1 - v_2)^2, the REx reference script's penalty.
    """
    if convention not in VARIANCE_CONVENTIONS:
        raise ValueError(f"variance convention must be one of {VARIANCE_CONVENTIONS}, got {convention!r}")
    if values.dim() != 1 or values.numel() < 2:
        raise ValueError(f"need a 1-D tensor of at least 2 environment values, got shape {tuple(values.shape)}")
    centred_sq = (values - values.mean()).pow(2).sum()
    n = values.numel()
    if convention == "population":
        return centred_sq / n
    unbiased = centred_sq / (n - 1)
    return 2.0 * unbiased if convention == "pairwise" else unbiased


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0 whose gradient is 0 (not inf/NaN) where x == 0.

    At x == 0 the true derivative is infinite; the penalty's subgradient there is 0 (all
    environments already agree), which is what an optimizer should see.
    """
    positive = x > 0
    # clamp keeps the unused branch finite: torch.where back-propagates into both branches
    return torch.where(positive, x.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(x))


def irm_penalty(logits: torch.Tensor, y: torch.Tensor, estimator: str = "full") -> torch.Tensor:
    """IRMv1 penalty of one environment: squared gradient of its risk w.r.t. a dummy scale.

    Args:
        logits: ``(N, C)`` or ``(N, 1)`` with graph attached.
        y: ``(N,)`` labels.
        estimator: ``"full"`` -- (d R(w * logits) / dw |_{w=1})^2 on the whole batch (Arjovsky's
            full-batch script); ``"two_halves"`` -- DomainBed's unbiased minibatch estimate, the
            product of the gradients on the even and the odd samples.
    Returns:
        A scalar, differentiable (``create_graph=True``).
    """
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    if estimator == "full":
        (grad,) = torch.autograd.grad(classification_loss(logits * scale, y), [scale], create_graph=True)
        return grad.pow(2)
    if estimator == "two_halves":
        (grad_even,) = torch.autograd.grad(classification_loss(logits[0::2] * scale, y[0::2]), [scale], create_graph=True)
        (grad_odd,) = torch.autograd.grad(classification_loss(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)
        return grad_even * grad_odd
    raise ValueError(f"irm_estimator must be 'full' or 'two_halves', got {estimator!r}")


def vrex_penalty(risks: torch.Tensor, convention: str = "pairwise") -> torch.Tensor:
    """V-REx penalty: the variance of the ``(E,)`` environment risks under ``convention``."""
    return variance(risks, convention)


def score_norms(risks: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """I(e) = || -d R_e / d x_e ||_2 for every environment, differentiable (double backprop).

    Args:
        risks: E scalars, R_e computed from ``inputs[e]`` only.
        inputs: E tensors ``(N_e, ...)`` that require grad (the minibatch of each environment).
    Returns:
        ``(E,)`` tensor of L2 norms of each environment's whole score tensor (all samples and
        input dimensions flattened), in at least float32 whatever the input precision.

    One backward pass serves all environments: since R_e depends on x_e alone, the gradient of
    sum_e R_e with respect to x_e is d R_e / d x_e.
    """
    scores = torch.autograd.grad(torch.stack(list(risks)).sum(), list(inputs), create_graph=True)
    return torch.stack([l2_norm(s) for s in scores])


def score_norms_through_linear(
    risks: Sequence[torch.Tensor], projections: Sequence[torch.Tensor], weight: torch.Tensor
) -> torch.Tensor:
    """The same I(e) as ``score_norms``, for inputs that reach the risk only through a linear map.

    When ``x_e`` (flattened, ``(N_e, D)``) enters the network only as ``z_e = x_e W^T + b`` with
    ``W`` of shape ``(H, D)``, the score is ``dR_e/dx_e = G_e W`` with ``G_e = dR_e/dz_e`` of
    shape ``(N_e, H)``, hence

        ||dR_e/dx_e||^2 = trace(W^T G_e^T G_e W) = sum((G_e^T G_e) * (W W^T)).

    The ``(N_e, D)`` score is never formed: the penalty costs two ``N x H x H`` products (the
    Gram matrix and its one-product backward) instead of three ``N x H x D`` ones and an
    ``N x D`` elementwise pass, so it is the cheaper way while H < 1.5 D.

    Args:
        risks: E scalars, R_e computed from ``projections[e]`` only.
        projections: E tensors ``z_e`` ``(N_e, H)``, the linear layer's outputs, in the graph.
        weight: ``W`` ``(H, D)``, the linear layer's weight.
    Returns:
        ``(E,)`` norms in at least float32, differentiable; gradient 0 where a score is 0.
    """
    grads = torch.autograd.grad(torch.stack(list(risks)).sum(), list(projections), create_graph=True)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    weight_gram = weight.to(dtype) @ weight.to(dtype).T
    squared = [(gram(g.to(dtype)) * weight_gram).sum() for g in grads]
    # safe_sqrt: 0 (not NaN) gradient at a zero score, and rounding below 0 reads as 0
    return torch.stack([safe_sqrt(sq) for sq in squared])


class _Gram(torch.autograd.Function):
    """g^T g whose backward is one product, g (dG + dG^T), where autograd's takes two."""

    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g)
        return g.T @ g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (g,) = ctx.saved_tensors
        return g @ (grad + grad.T)


def gram(g: torch.Tensor) -> torch.Tensor:
    """``(H, H)`` Gram matrix g^T g of ``g`` ``(N, H)``; differentiable once (like ``l2_norm``)."""
    return _Gram.apply(g)


class _L2Norm(torch.autograd.Function):
    """||s||_2 whose backward is one pass over ``s``: grad_s = s * (grad / ||s||), 0 where s == 0.

    torch's own norm backward makes three passes over ``s`` (a multiply, a divide and a
    masked fill, each the size of the input); with SIL's score of 2 x 25,000 x 392 floats
    they were a fifth of a Colored MNIST step at hidden width 64 (results/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:
        # at least float32 (the protocol computes the penalty in float32 under lower precision)
        norm = torch.linalg.vector_norm(s, dtype=torch.promote_types(s.dtype, torch.float32))
        ctx.save_for_backward(s, norm)
        return norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        s, norm = ctx.saved_tensors
        # the scalar is formed first, so the big tensor is touched once
        scale = torch.where(norm > 0, grad / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
        return s * scale.to(s.dtype)


def l2_norm(s: torch.Tensor) -> torch.Tensor:
    """L2 norm of the whole tensor ``s`` (any shape), a scalar of at least float32; gradient 0 at s == 0.

    Differentiable once (what the SIL objective needs: its gradient flows back into the graph
    that produced ``s``); the backward itself is not differentiated again.
    """
    return _L2Norm.apply(s)


def sil_penalty(norms: torch.Tensor, convention: str = "unbiased") -> torch.Tensor:
    """SIL penalty sqrt(Var({I(e)})) of ``(E,)`` score norms; finite gradient when all are equal."""
    return safe_sqrt(variance(norms.float(), convention))

