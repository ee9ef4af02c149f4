"""Benchmark providers: who computes each loss, and the inputs every provider receives.

A provider turns ``(loss, N, D, device)`` into a closure that runs the loss forward on fresh inputs
(leaves with ``requires_grad``) and returns what the backward starts from. ``N`` is the number of
anchors = contrast columns (two views of N/2 samples; ``[N/2, 2, D]`` view-major, SPEC.md notation).

Providers
---------
- ``reference``   : ``ltcl_fused.reference`` (the dense oracle, O(N²) memory).
- ``pml``         : pytorch-metric-learning's ``SupConLoss`` (supcon only; dense).
- ``supcontrast`` : a dense transcription of SupContrast's ``SupConLoss`` as SPEC.md §1 describes it
                    (float masks, row-max shift, ``log Σ exp`` over the logits mask), written here.
- ``afcl_paper``  : a dense transcription of the released AFCL code as SPEC.md §2 describes it
                    (softmax matrix, ``(1 − p)^γ``, ``log(1 − p)``, 1/N normalisation, zero on NaN).
- ``torch`` / ``cpu`` / ``triton`` / ``cuda`` : ``ltcl_fused.<loss>(..., backend=name)``.
- ``gemm4``       : not a loss: the four N×N×D matrix products a recompute-based forward+backward
                    cannot avoid (S = A Cᵀ, S again in backward, G C, Gᵀ A), run in row blocks so that
                    N×N is never stored; for large N a subset of row blocks is timed and scaled.

Losses: ``supcon``; ``afcl`` (γ=2, η=10: both focal and asymmetric terms on); ``bcl`` (100 prototypes);
``mining`` (``hard_pair_mining`` of N anchors against N keys, k_pos=1, k_neg=400: forward only).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

SSL_LOSSES = ("dcl", "hcl", "bayesian_cl", "mttv")  # two views z1, z2 [N/2, D] (mttv: [N, D] interleaved)
LOSSES = ("supcon", "afcl", "bcl", "mining") + SSL_LOSSES
N_CLASSES = 100
TAU = 0.07
AFCL_GAMMA, AFCL_ETA = 2.0, 10.0
MINING_KPOS, MINING_KNEG = 1, 400

FUSED = ("torch", "cpu", "triton", "cuda")
DENSE = ("reference", "pml", "supcontrast", "afcl_paper")
ALL_PROVIDERS = DENSE + FUSED + ("gemm4",)


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def long_tailed_labels(n: int, n_classes: int = N_CLASSES, ratio: float = 100.0, gen=None) -> torch.Tensor:
    """``n`` labels drawn from an exponential long-tailed class profile (imbalance ratio ``ratio``)."""
    w = ratio ** (-torch.arange(n_classes, dtype=torch.float64) / max(n_classes - 1, 1))
    return torch.multinomial(w / w.sum(), n, replacement=True, generator=gen)


def make_inputs(loss: str, N: int, D: int, device, dtype=torch.float32, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Unit-norm features and long-tailed labels; ``N`` anchors (two views of N//2 samples)."""
    g = torch.Generator().manual_seed(seed)
    if loss == "mining":
        a = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
        k = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
        return {"anchors": a.to(device, dtype), "anchor_labels": long_tailed_labels(N, gen=g).to(device),
                "keys": k.to(device, dtype), "key_labels": long_tailed_labels(N, gen=g).to(device)}
    B = N // 2
    x = F.normalize(torch.randn(B, 2, D, generator=g, dtype=torch.float64), dim=-1)
    if loss in SSL_LOSSES:  # N anchors: the 2B rows of the two views (or of the interleaved MTTV embeddings)
        if loss == "mttv":
            return {"embeddings": x.reshape(2 * B, D).to(device, dtype).requires_grad_(True)}
        return {"z1": x[:, 0].contiguous().to(device, dtype).requires_grad_(True),
                "z2": x[:, 1].contiguous().to(device, dtype).requires_grad_(True)}
    out = {"features": x.to(device, dtype).requires_grad_(True), "labels": long_tailed_labels(B, gen=g).to(device)}
    if loss == "bcl":
        # every label must have a prototype: classes 0..N_CLASSES-1
        p = F.normalize(torch.randn(N_CLASSES, D, generator=g, dtype=torch.float64), dim=-1)
        out["prototypes"] = p.to(device, dtype).requires_grad_(True)
    return out


# ----------------------------------------------------------------------------------------------------------
# dense transcriptions (written from SPEC.md's description of the authors' released code)
# ----------------------------------------------------------------------------------------------------------
def supcontrast_dense(features: torch.Tensor, labels: torch.Tensor, temperature=TAU, base_temperature=None):
    """SupContrast-style SupCon, dense: float masks over the full (V·B)×(V·B) matrix, contrast_mode 'all'."""
    base_temperature = temperature if base_temperature is None else base_temperature
    B, Vw, _ = features.shape
    flat = torch.cat(torch.unbind(features, dim=1), dim=0)              # view-major [V·B, D]
    same = (labels[:, None] == labels[None, :]).float().repeat(Vw, Vw)  # label-equality mask, tiled per view
    sim = flat @ flat.T / temperature
    shifted = sim - sim.max(dim=1, keepdim=True).values.detach()        # numerical shift by the row max
    not_self = 1.0 - torch.eye(Vw * B, device=features.device, dtype=sim.dtype)
    pos = same * not_self
    denom = (torch.exp(shifted) * not_self).sum(dim=1, keepdim=True)
    log_prob = shifted - torch.log(denom)
    npos = pos.sum(dim=1)
    npos = torch.where(npos < 1e-6, torch.ones_like(npos), npos)        # anchors without positives: 0
    mean_log_prob_pos = (pos * log_prob).sum(dim=1) / npos
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def afcl_paper_dense(features: torch.Tensor, labels: torch.Tensor, gamma=AFCL_GAMMA, eta=AFCL_ETA, temperature=TAU):
    """AFCL as the released code computes it: the full softmax matrix p, then masked sums divided by N.

    ``T⁺ = −(1/N) Σ_P (1 − p)^γ log p``, ``T⁻ = −(1/N) Σ_N log(1 − p)`` (plain ``log(1 − p)``), loss
    ``mean(T⁺ + η T⁻)``; a NaN loss is replaced by a gradient-less zero, as the released code does.
    """
    B, Vw, _ = features.shape
    flat = torch.cat(torch.unbind(features, dim=1), dim=0)
    n = flat.shape[0]
    same = (labels[:, None] == labels[None, :]).float().repeat(Vw, Vw)
    not_self = 1.0 - torch.eye(n, device=features.device, dtype=flat.dtype)
    pos = same * not_self
    neg = (1.0 - same) * not_self
    sim = flat @ flat.T / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    exp_sim = torch.exp(sim) * not_self
    log_p = sim - torch.log(exp_sim.sum(dim=1, keepdim=True))
    p = torch.exp(log_p) * not_self
    t_pos = -(pos * (1.0 - p) ** gamma * log_p).sum(dim=1) / n
    t_neg = -(neg * torch.log(1.0 - p)).sum(dim=1) / n
    loss = (t_pos + eta * t_neg).mean()
    if torch.isnan(loss):
        return torch.zeros((), device=loss.device, dtype=loss.dtype)
    return loss


# ----------------------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------------------
def supports(provider: str, loss: str) -> bool:
    if provider == "gemm4":
        return loss != "mining"
    if provider in ("pml", "supcontrast"):
        return loss == "supcon"
    if provider == "afcl_paper":
        return loss == "afcl"
    return True


def unavailable_reason(provider: str, loss: str, device: torch.device) -> Optional[str]:
    """None when ``provider`` can run ``loss`` on ``device`` here; else one line saying why."""
    if not supports(provider, loss):
        return f"{provider} does not implement {loss}"
    if provider == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the environment
            return f"pytorch-metric-learning not importable ({type(e).__name__})"
    if provider in ("triton", "cuda") and device.type != "cuda":
        return f"backend {provider!r} needs a CUDA device"
    if provider == "cpu" and device.type != "cpu":
        return "backend 'cpu' runs on CPU tensors only"
    if provider in FUSED:
        # a tiny call of the public API: raises BackendUnavailable / NotImplementedError when not ready
        try:
            inp = make_inputs(loss, 8, 4, device)
            out = _public_call(loss, provider, inp)
            if loss != "mining":
                out.backward()
        except (NotImplementedError, ImportError) as e:  # not built / not written yet: the package's reason
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        except Exception as e:  # noqa: BLE001
            from ltcl_fused import BackendUnavailable
            if isinstance(e, BackendUnavailable):
                return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            raise  # a backend that exists but fails is an error, not "unavailable"
    return None


def _public_call(loss: str, backend: str, inp):
    import ltcl_fused as lf
    if loss in SSL_LOSSES:
        return getattr(lf, loss)(**inp, backend=backend)
    if loss == "supcon":
        return lf.supcon(inp["features"], inp["labels"], temperature=TAU, backend=backend)
    if loss == "afcl":
        return lf.afcl(inp["features"], inp["labels"], gamma=AFCL_GAMMA, eta=AFCL_ETA, temperature=TAU,
                       backend=backend)
    if loss == "bcl":
        return lf.bcl(inp["features"], inp["labels"], inp["prototypes"], temperature=TAU, backend=backend)
    if loss == "mining":
        kpos, kneg = _mining_k(inp)
        return lf.hard_pair_mining(inp["anchors"], inp["anchor_labels"], inp["keys"], inp["key_labels"],
                                   k_pos=kpos, k_neg=kneg, backend=backend)
    raise ValueError(loss)


def _mining_k(inp) -> Tuple[int, int]:
    """k_pos/k_neg capped so that every anchor has enough candidates (tiny N in smoke tests)."""
    from collections import Counter
    a, k = inp["anchor_labels"].tolist(), Counter(inp["key_labels"].tolist())
    n_keys = len(inp["key_labels"])
    min_pos = min(k.get(y, 0) for y in a)
    min_neg = min(n_keys - k.get(y, 0) for y in a)
    return min(MINING_KPOS, min_pos), min(MINING_KNEG, min_neg)


def build(provider: str, loss: str, inp) -> Callable[[], torch.Tensor]:
    """A closure that runs the forward of ``loss`` by ``provider`` on ``inp`` and returns its output."""
    if provider in FUSED:
        return lambda: _public_call(loss, provider, inp)
    if provider == "reference":
        import ltcl_fused.reference as R
        if loss in SSL_LOSSES:
            return lambda: getattr(R, loss)(**inp)
        if loss == "supcon":
            return lambda: R.supcon(inp["features"], inp["labels"], temperature=TAU)
        if loss == "afcl":
            return lambda: R.afcl(inp["features"], inp["labels"], gamma=AFCL_GAMMA, eta=AFCL_ETA, temperature=TAU)
        if loss == "bcl":
            return lambda: R.bcl(inp["features"], inp["labels"], inp["prototypes"], temperature=TAU)
        if loss == "mining":
            kpos, kneg = _mining_k(inp)
            return lambda: R.hard_pair_mining(inp["anchors"], inp["anchor_labels"], inp["keys"], inp["key_labels"],
                                              k_pos=kpos, k_neg=kneg)
    if provider == "pml":
        from pytorch_metric_learning.losses import SupConLoss
        fn = SupConLoss(temperature=TAU)
        x, y = inp["features"], inp["labels"]

        def run():
            flat = torch.cat(torch.unbind(x, dim=1), dim=0)
            return fn(flat, y.repeat(x.shape[1]))
        return run
    if provider == "supcontrast":
        return lambda: supcontrast_dense(inp["features"], inp["labels"])
    if provider == "afcl_paper":
        return lambda: afcl_paper_dense(inp["features"], inp["labels"])
    raise ValueError(f"provider {provider!r} cannot run {loss!r}")


def leaves(inp):
    return [t for t in inp.values() if isinstance(t, torch.Tensor) and t.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# the four-GEMM bound
# ----------------------------------------------------------------------------------------------------------
def gemm4_runner(N: int, D: int, device, dtype=torch.float32, max_rows_timed: Optional[int] = None):
    """(run, scale): ``run()`` does the four N×N×D products for some row blocks; time × ``scale`` = full bound.

    Rows are processed in blocks of ``rb`` (≤ 2^22 elements of S per block, i.e. 16 MiB in fp32),
    so memory stays O(rb·N). With ``max_rows_timed`` only that many rows are run and the time is scaled
    by N / rows (every block does identical work).
    """
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, D, generator=g).to(device, dtype)
    rb = max(1, min(N, (1 << 22) // N))
    rows = N if max_rows_timed is None else min(N, max(rb, (max_rows_timed // rb) * rb))
    buf_s = torch.empty(rb, N, device=device, dtype=dtype)
    dA = torch.empty(rb, D, device=device, dtype=dtype)
    dC = torch.zeros(N, D, device=device, dtype=dtype)

    def run():
        for r0 in range(0, rows, rb):
            r1 = min(rows, r0 + rb)
            a = A[r0:r1]
            s = buf_s[: r1 - r0]
            torch.mm(a, A.T, out=s)               # forward: S = A Cᵀ
            torch.mm(a, A.T, out=s)               # backward: recompute S
            torch.mm(s, A, out=dA[: r1 - r0])     # dA = G C
            dC.addmm_(s.T, a)                     # dC += Gᵀ A
        return dC

    return run, N / rows
