"""Fused backwards are first-order only: differentiating their gradients again raises one clear error.

The engines' backward formulas (``rowstats_backward``, ``ssl_backward``) are evaluated from saved per-row
statistics that are constants to autograd, so a graph built through them (``create_graph=True``) would give
wrong Hessian-vector products (or, for the C++ and Triton ops, none at all). The autograd wrappers therefore
compute the backward without a graph and, when a graph is being recorded, hand back gradients whose own
``grad_fn`` raises :func:`message` the moment anything differentiates through them. ``create_graph=True``
alone still works (e.g. to log a gradient norm); the dense ``backend="reference"`` is differentiable twice.
"""
from __future__ import annotations

import torch


def message(fn: str, backend: str) -> str:
    return (f"{fn}: backend {backend!r} has first-order gradients only; differentiating them again "
            f"(create_graph=True, then a gradient of the gradient: Hessian-vector products, gradient "
            f"penalties) is not supported. Use backend='reference' (dense, differentiable twice) for that.")


def first_order(fn: str, backend: str, grads, inputs):
    """``grads`` (computed under ``no_grad``), marked so that a second differentiation raises; unchanged when
    no graph is being recorded (the ordinary ``create_graph=False`` backward).

    The marking node takes the forward's differentiable ``inputs`` (the saved A, C) as extra inputs, so a
    second ``autograd.grad``/``backward`` towards the features always passes through it and raises; without
    them the graph of the gradients would end at detached leaves and the features would look unused (or,
    with other paths to them such as ``normalize=True``, give a silently wrong Hessian-vector product)."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    live = [i for i, g in enumerate(grads) if g is not None]
    anchors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not live or not anchors:
        return tuple(grads)
    err = torch._C._functions.DelayedError(message(fn, backend), len(live) + len(anchors))
    marked = err(*[grads[i].detach().requires_grad_() for i in live], *anchors)
    if not isinstance(marked, (tuple, list)):
        marked = (marked,)
    out = list(grads)
    for i, g in zip(live, marked):
        out[i] = g
    return tuple(out)
