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


def first_order(fn: str, backend: str, *grads):
    """``grads`` (computed under ``no_grad``), marked so that a second differentiation raises; unchanged when
    no graph is being recorded (the ordinary ``create_graph=False`` backward)."""
    if not torch.is_grad_enabled():
        return grads
    live = [i for i, g in enumerate(grads) if g is not None]
    if not live:
        return grads
    err = torch._C._functions.DelayedError(message(fn, backend), len(live))
    marked = err(*[grads[i].detach().requires_grad_() for i in live])
    if not isinstance(marked, (tuple, list)):
        marked = (marked,)
    out = list(grads)
    for i, g in zip(live, marked):
        out[i] = g
    return tuple(out)
