"""``torch.nn.Module`` forms of every loss: settings in the constructor, tensors in ``forward``.

Each module holds the keyword arguments of one functional loss and calls that function in ``forward``
(there is no second implementation: ``SupConLoss(**kw)(x, y)`` is ``ltcl_fused.supcon(x, y, **kw)``, bit
for bit). The settings are checked once, at construction, by the functional loss itself (it is run on a
tiny probe batch with ``backend="torch"``), so a bad setting raises the same error, with the same message,
as the functional form, before the first training step. They stay plain attributes: ``loss.temperature
= 0.05`` changes the next call (the functional checks its arguments on every call anyway).

The softmax-family modules (SupCon, AFCL/FCL/ACL, BCL, ResCom) take ``distributed=True`` to call
``ltcl_fused.distributed.<loss>`` instead, with its ``mode``, ``group`` and ``grad_sync``: every rank passes
its own slice of the batch and gets the loss of the global batch (see docs/distributed.md).

``ResComLoss`` owns its class-balanced queue (a ``ClassBalancedQueue`` submodule, whose buffers are in
``state_dict`` and move with ``.to(device)``) and, in training mode, enqueues the batch after the loss.
"""
from __future__ import annotations

import numbers
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import backends as _backends
from .reference import ClassBalancedQueue

__all__ = ["SupConLoss", "AFCLLoss", "FCLLoss", "ACLLoss", "BCLLoss", "ResComLoss", "DCLLoss", "HCLLoss",
           "BayesianCLLoss", "MTTVLoss"]

_MODES = ("gather", "ring")
_GRAD_SYNCS = ("mean", "sum")


def _package():
    """``ltcl_fused`` itself (imported by the time any loss is called): the public functional losses."""
    return sys.modules[__name__.rpartition(".")[0]]


def _probe_batch(B: int = 2, V: int = 2, D: int = 3) -> torch.Tensor:
    """A small, fixed, well-conditioned float64 batch [B, V, D] on the CPU (no random state touched)."""
    x = torch.arange(1, B * V * D + 1, dtype=torch.float64).reshape(B, V, D)
    return torch.nn.functional.normalize(torch.sin(x), dim=-1)


class _FunctionalLoss(torch.nn.Module):
    """Base: ``_name`` is the function in ``ltcl_fused`` (and ``ltcl_fused.distributed``) this module calls."""

    _name: str = ""

    def _init_settings(self, settings: Dict[str, Any], distributed: bool = False, mode: str = "gather",
                       group: Any = None, grad_sync: str = "mean") -> None:
        self._setting_names: Tuple[str, ...] = tuple(settings)
        for k, v in settings.items():
            setattr(self, k, v)
        self.distributed = bool(distributed)
        if self.distributed:
            self._check_distributed(mode, grad_sync, settings.get("backend", "auto"))
            self.mode, self.group, self.grad_sync = mode, group, grad_sync
        _backends.check_backend_name(settings.get("backend", "auto"), self._fn_path())
        with torch.no_grad():
            self._probe()

    # --- what each subclass provides ---
    def _probe(self) -> None:
        """Call the functional loss with this module's settings on a tiny valid batch (backend='torch')."""
        raise NotImplementedError

    # --- shared machinery ---
    def _fn_path(self) -> str:
        return f"ltcl_fused.{'distributed.' if self.distributed else ''}{self._name}"

    def _check_distributed(self, mode: str, grad_sync: str, backend: str) -> None:
        fn = f"ltcl_fused.distributed.{self._name}"
        if mode not in _MODES:
            raise ValueError(f"{fn}: `mode` must be one of {', '.join(map(repr, _MODES))}; got {mode!r}")
        if grad_sync not in _GRAD_SYNCS:
            raise ValueError(f"{fn}: `grad_sync` must be one of {', '.join(map(repr, _GRAD_SYNCS))}; got {grad_sync!r}")
        if backend == "reference":
            raise ValueError(f"{fn}: `backend`='reference' is the dense single-process oracle and has no "
                             f"distributed form; use 'auto' or a fused backend")

    def _settings(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self._setting_names}

    def _functional(self) -> Callable[..., torch.Tensor]:
        if self.distributed:
            from . import distributed
            return getattr(distributed, self._name)
        return getattr(_package(), self._name)

    def _call(self, *tensors: Any, **tensor_kwargs: Any) -> torch.Tensor:
        kw = self._settings()
        kw.update(tensor_kwargs)
        if self.distributed:
            kw.update(mode=self.mode, group=self.group, grad_sync=self.grad_sync)
        return self._functional()(*tensors, **kw)

    def _single_process(self, *tensors: Any, **kw: Any) -> torch.Tensor:
        """The probe: the single-process functional with the settings, backend='torch'."""
        settings = self._settings()
        settings.update(kw)
        settings["backend"] = "torch"
        return getattr(_package(), self._name)(*tensors, **settings)

    def extra_repr(self) -> str:
        parts = [f"{k}={getattr(self, k)!r}" for k in self._setting_names if not isinstance(getattr(self, k),
                                                                                            torch.Tensor)]
        if self.distributed:
            parts.append(f"distributed=True, mode={self.mode!r}, grad_sync={self.grad_sync!r}")
        return ", ".join(parts)


class _SupervisedLoss(_FunctionalLoss):
    """forward(features [N, D] or [B, V, D], labels=None, ref_features=None, ref_labels=None)."""

    def _probe(self) -> None:
        x = _probe_batch()
        self._single_process(x, torch.tensor([0, 1]))

    def forward(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
                ref_features: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._call(features, labels, ref_features=ref_features, ref_labels=ref_labels)


class SupConLoss(_SupervisedLoss):
    """``ltcl_fused.supcon`` as a module: SupCon (Khosla et al. 2020); SimCLR's NT-Xent without labels.

    ``forward(features, labels=None, ref_features=None, ref_labels=None)``; ``features`` is ``[N, D]`` or
    ``[B, V, D]`` (views flattened view-major), used as given unless ``normalize=True``.
    """

    _name = "supcon"

    def __init__(self, *, temperature: float = 0.07, base_temperature: Optional[float] = None,
                 contrast_mode: str = "all", normalize: bool = False, reduction: str = "mean",
                 backend: str = "auto", check_finite: bool = True, distributed: bool = False, mode: str = "gather",
                 group: Any = None, grad_sync: str = "mean") -> None:
        super().__init__()
        self._init_settings(dict(temperature=temperature, base_temperature=base_temperature,
                                 contrast_mode=contrast_mode, normalize=normalize, reduction=reduction,
                                 backend=backend, check_finite=check_finite), distributed, mode, group, grad_sync)


class AFCLLoss(_SupervisedLoss):
    """``ltcl_fused.afcl`` as a module: asymmetric focal contrastive loss, ``ℓ_i = T⁺_i + η T⁻_i``.

    γ = η = 0 is plain CL, η = 0 FCL, γ = 0 ACL. ``forward`` as :class:`SupConLoss`.
    """

    _name = "afcl"

    def __init__(self, *, gamma: float = 0.0, eta: float = 0.0, temperature: float = 0.07,
                 normalize_by: str = "batch", contrast_mode: str = "all", normalize: bool = False,
                 reduction: str = "mean", backend: str = "auto", check_finite: bool = True,
                 distributed: bool = False, mode: str = "gather", group: Any = None,
                 grad_sync: str = "mean") -> None:
        super().__init__()
        self._init_settings(dict(gamma=gamma, eta=eta, temperature=temperature, normalize_by=normalize_by,
                                 contrast_mode=contrast_mode, normalize=normalize, reduction=reduction,
                                 backend=backend, check_finite=check_finite), distributed, mode, group, grad_sync)


class FCLLoss(_SupervisedLoss):
    """``ltcl_fused.fcl`` as a module: focal contrastive loss (AFCL with η = 0; γ = 1 is Core-tuning's)."""

    _name = "fcl"

    def __init__(self, *, gamma: float = 1.0, temperature: float = 0.07, normalize_by: str = "batch",
                 contrast_mode: str = "all", normalize: bool = False, reduction: str = "mean",
                 backend: str = "auto", check_finite: bool = True, distributed: bool = False,
                 mode: str = "gather", group: Any = None, grad_sync: str = "mean") -> None:
        super().__init__()
        self._init_settings(dict(gamma=gamma, temperature=temperature, normalize_by=normalize_by,
                                 contrast_mode=contrast_mode, normalize=normalize, reduction=reduction,
                                 backend=backend, check_finite=check_finite), distributed, mode, group, grad_sync)


class ACLLoss(_SupervisedLoss):
    """``ltcl_fused.acl`` as a module: asymmetric contrastive loss (AFCL with γ = 0)."""

    _name = "acl"

    def __init__(self, *, eta: float = 1.0, temperature: float = 0.07, normalize_by: str = "batch",
                 contrast_mode: str = "all", normalize: bool = False, reduction: str = "mean",
                 backend: str = "auto", check_finite: bool = True, distributed: bool = False,
                 mode: str = "gather", group: Any = None, grad_sync: str = "mean") -> None:
        super().__init__()
        self._init_settings(dict(eta=eta, temperature=temperature, normalize_by=normalize_by,
                                 contrast_mode=contrast_mode, normalize=normalize, reduction=reduction,
                                 backend=backend, check_finite=check_finite), distributed, mode, group, grad_sync)


class BCLLoss(_FunctionalLoss):
    """``ltcl_fused.bcl`` as a module: balanced contrastive learning with class prototypes.

    ``forward(features, labels, prototypes)``: ``prototypes [C, D]`` is usually a projection of the
    classifier weights (a tensor of the model, so it is an argument of ``forward``, not a setting).
    """

    _name = "bcl"
    def __init__(self, *, temperature: float = 0.07, normalize: bool = False, reduction: str = "mean",
                 backend: str = "auto", check_finite: bool = True, distributed: bool = False,
                 mode: str = "gather", group: Any = None, grad_sync: str = "mean") -> None:
        super().__init__()
        self._init_settings(dict(temperature=temperature, normalize=normalize, reduction=reduction,
                                 backend=backend, check_finite=check_finite), distributed, mode, group, grad_sync)

    def _probe(self) -> None:
        x = _probe_batch()
        self._single_process(x, torch.tensor([0, 1]), x[:, 0])

    def forward(self, features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return self._call(features, labels, prototypes)


class ResComLoss(_FunctionalLoss):
    """``ltcl_fused.rescom`` (ResCom's L_con) as a module that owns its class-balanced queue.

    ``ResComLoss(num_classes, size_per_class, dim, *, k_pos=1, k_neg=400, temperature=0.2, ...)`` creates
    ``self.queue``, a :class:`ltcl_fused.ClassBalancedQueue` (``ltcl_fused.distributed.ClassBalancedQueue``
    with ``distributed=True``) whose buffers (``queue.features``, ``queue.labels``, ``queue.ptr``,
    ``queue.filled``) and ``class_weights`` are buffers of this module: ``state_dict`` saves and restores
    them, ``.to(device)`` moves them. ``forward(features, labels)`` mines the current queue; then, when
    ``update_queue`` and the module is in training mode, it enqueues the batch (detached): view 0 of a
    ``[b, V, D]`` batch, every row of a ``[N, D]`` batch. Pass ``update_queue=False`` and call
    ``loss.queue.enqueue(feats, labels)`` yourself for any other policy.

    ``allow_fewer`` defaults to True here (False in ``ltcl_fused.rescom``): the queue starts empty, and an
    anchor whose class has fewer than ``k_pos`` keys then uses the keys there are. The queue's keys are cast
    to the features' dtype at each call (keep the queue in float32 under autocast).
    """

    _name = "rescom"
    def __init__(self, num_classes: int, size_per_class: int, dim: int, *, k_pos: int = 1, k_neg: int = 400,
                 temperature: float = 0.2, class_weights: Optional[torch.Tensor] = None, reduction: str = "mean",
                 backend: str = "auto", allow_fewer: bool = True, check_finite: bool = True,
                 update_queue: bool = True, queue_dtype: torch.dtype = torch.float32, distributed: bool = False,
                 mode: str = "gather", group: Any = None, grad_sync: str = "mean") -> None:
        super().__init__()
        if distributed:
            from .distributed import ClassBalancedQueue as DistQueue
            self.queue = DistQueue(num_classes, size_per_class, dim, dtype=queue_dtype, group=group)
        else:
            self.queue = ClassBalancedQueue(num_classes, size_per_class, dim, dtype=queue_dtype)
        w = None if class_weights is None else torch.as_tensor(class_weights)
        self.register_buffer("class_weights", w)
        self.update_queue = bool(update_queue)
        self._init_settings(dict(k_pos=k_pos, k_neg=k_neg, temperature=temperature, reduction=reduction,
                                 backend=backend, allow_fewer=allow_fewer, check_finite=check_finite),
                            distributed, mode, group, grad_sync)

    def _probe(self) -> None:
        C, D = self.queue.num_classes, self.queue.dim
        x = _probe_batch(2, 2, D)
        lab = torch.tensor([0, C - 1])
        queue, q_lab = x[:, 1].clone(), lab.clone()

        def small(k):  # a valid k is valid whatever its size: keep the probe's [M, k] state small
            return min(k, 2) if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k
        w = None if self.class_weights is None else self.class_weights.detach().to("cpu", torch.float64)
        self._single_process(x, lab, queue, q_lab, k_pos=small(self.k_pos), k_neg=small(self.k_neg),
                             allow_fewer=True, class_weights=w)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        qdev = self.queue.features.device
        if isinstance(features, torch.Tensor) and features.device != qdev:
            raise ValueError(f"ltcl_fused.nn.ResComLoss: the queue is on {qdev} but `features` are on "
                             f"{features.device}; move the loss module too (loss_fn.to(device))")
        keys, key_labels = self.queue.keys()
        if isinstance(features, torch.Tensor) and features.is_floating_point():
            keys = keys.to(features.dtype)
        loss = self._call(features, labels, keys, key_labels, class_weights=self.class_weights)
        if self.update_queue and self.training:
            self.enqueue(features, labels)
        return loss

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # class weights saved by a module that had them load into one built without them
        key = prefix + "class_weights"
        if self.class_weights is None and key in state_dict:
            self.class_weights = torch.empty_like(state_dict[key], device=self.queue.features.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write a batch into the queue: view 0 of ``[b, V, D]`` features, every row of ``[N, D]`` ones."""
        rows = features[:, 0] if features.dim() == 3 else features
        self.queue.enqueue(rows.detach(), labels)

    def extra_repr(self) -> str:
        q = self.queue
        head = f"num_classes={q.num_classes}, size_per_class={q.size_per_class}, dim={q.dim}, "
        w = "" if self.class_weights is None else f", class_weights=[{self.class_weights.numel()}]"
        return head + super().extra_repr() + w + f", update_queue={self.update_queue}"


class _TwoViewLoss(_FunctionalLoss):
    """forward(z1 [B, D], z2 [B, D]): the two views of a self-supervised batch."""

    def _probe(self) -> None:
        x = _probe_batch(3, 2, 3)
        self._single_process(x[:, 0], x[:, 1])

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self._call(z1, z2)


class DCLLoss(_TwoViewLoss):
    """``ltcl_fused.dcl`` as a module: debiased contrastive loss; ``debiased=False`` is SimCLR."""

    _name = "dcl"

    def __init__(self, *, temperature: float = 0.5, tau_plus: float = 0.1, debiased: bool = True,
                 reduction: str = "mean", backend: str = "auto", check_finite: bool = True) -> None:
        super().__init__()
        self._init_settings(dict(temperature=temperature, tau_plus=tau_plus, debiased=debiased,
                                 reduction=reduction, backend=backend, check_finite=check_finite))


class HCLLoss(_TwoViewLoss):
    """``ltcl_fused.hcl`` as a module: hard-negative contrastive loss."""

    _name = "hcl"

    def __init__(self, *, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0,
                 reduction: str = "mean", backend: str = "auto", check_finite: bool = True) -> None:
        super().__init__()
        self._init_settings(dict(temperature=temperature, tau_plus=tau_plus, beta=beta, reduction=reduction,
                                 backend=backend, check_finite=check_finite))


class BayesianCLLoss(_TwoViewLoss):
    """``ltcl_fused.bayesian_cl`` as a module: Bayesian self-supervised contrastive loss (exact ranks)."""

    _name = "bayesian_cl"

    def __init__(self, *, alpha: float = 0.5, beta: float = 1.0, tau_plus: float = 0.1, temperature: float = 0.5,
                 reduction: str = "mean", backend: str = "auto", check_finite: bool = True) -> None:
        super().__init__()
        self._init_settings(dict(alpha=alpha, beta=beta, tau_plus=tau_plus, temperature=temperature,
                                 reduction=reduction, backend=backend, check_finite=check_finite))


class MTTVLoss(_FunctionalLoss):
    """``ltcl_fused.mttv`` as a module: more-than-two-views loss with the extreme-feature filter.

    ``forward(embeddings [2B, D])``, rows 2k and 2k+1 positives.
    """

    _name = "mttv"

    def __init__(self, *, lower: float = 0.1, upper: float = 0.9, temperature: float = 0.3, filter: str = "both",
                 official_self_term: bool = False, reduction: str = "mean", backend: str = "auto",
                 check_finite: bool = True) -> None:
        super().__init__()
        self._init_settings(dict(lower=lower, upper=upper, temperature=temperature, filter=filter,
                                 official_self_term=official_self_term, reduction=reduction, backend=backend,
                                 check_finite=check_finite))

    def _probe(self) -> None:
        self._single_process(_probe_batch(2, 2, 3).reshape(4, 3))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self._call(embeddings)
