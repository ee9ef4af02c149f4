"""ltcl_fused.distributed against the single-process reference, with real Gloo processes on loopback.

One spawn per world size (2 and 3) runs every case on every rank and saves the per-rank results; each
test then compares them with ``ltcl_fused.<loss>(backend="reference")`` on the concatenated global batch
(computed here, in the parent process). Batches are uneven across ranks, class counts are uneven and the
last rank holds a class no other rank has. Inputs are float64 so tolerances are tight.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ltcl_fused as lf

from _dist import WORLDS, ok, run_worlds, spawn_results


D = 5
V = 2
MODES = ("gather", "ring", "ring-cpu")  # "ring-cpu": ring mode on the C++ engine (the CPU default)
ATOL = 1e-10


# ---------------------------------------------------------------------------------------------------------------
# data: deterministic per (world size, case); the parent rebuilds the same tensors for the reference
# ---------------------------------------------------------------------------------------------------------------


def _sizes(W):
    return [3 + 2 * r for r in range(W)]  # uneven: 3, 5, 7 samples


def _labels(W, seed):
    """Per-rank labels: classes 0..3 in uneven proportions, class 4 only on the last rank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, B in enumerate(_sizes(W)):
        p = torch.tensor([0.5, 0.25, 0.15, 0.1])
        lab = torch.multinomial(p, B, replacement=True, generator=g)
        if r == W - 1:
            lab[0] = 4
            lab[1] = 4
        out.append(lab)
    return out


def _feats(W, seed, views=V, dim=D):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, views, dim, generator=g, dtype=torch.float64) * 0.7 for B in _sizes(W)]


def _refs(W, seed):
    g = torch.Generator().manual_seed(seed + 99)
    feats = [torch.randn(2 + r, D, generator=g, dtype=torch.float64) for r in range(W)]
    labs = [torch.randint(0, 5, (2 + r,), generator=g) for r in range(W)]
    return feats, labs


def _prototypes(seed, n=5):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(n, D, generator=g, dtype=torch.float64)


def _queue(seed, K=3, n_cls=5):
    g = torch.Generator().manual_seed(seed + 13)
    q = torch.nn.functional.normalize(torch.randn(n_cls * K, D, generator=g, dtype=torch.float64), dim=1)
    return q, torch.arange(n_cls).repeat_interleave(K)


#: name -> (loss name, kwargs, extras). Every case runs in both modes unless "modes" says otherwise.
CASES = {
    "supcon": ("supcon", dict(temperature=0.3), {}),
    "supcon_simclr": ("supcon", dict(temperature=0.5), {"no_labels": True}),
    "supcon_one_ref_norm": ("supcon", dict(temperature=0.4, base_temperature=0.1, contrast_mode="one",
                                           normalize=True), {"ref": True}),
    "supcon_none": ("supcon", dict(temperature=0.3, reduction="none"), {}),
    "supcon_sum_gradmean": ("supcon", dict(temperature=0.3, reduction="sum", grad_sync="mean"), {}),
    "cl_batch": ("afcl", dict(temperature=0.5, normalize_by="batch"), {}),
    "afcl_batch": ("afcl", dict(temperature=0.5, gamma=2.0, eta=3.0, normalize_by="batch"), {}),
    "afcl_pairs": ("afcl", dict(temperature=0.5, gamma=1.5, eta=0.5, normalize_by="pairs"), {}),
    "afcl_pairs_simclr_ref": ("afcl", dict(temperature=0.5, gamma=1.0, eta=2.0, normalize_by="pairs"),
                              {"no_labels": True, "ref": True}),
    "bcl": ("bcl", dict(temperature=0.3), {}),
    "bcl_norm": ("bcl", dict(temperature=0.2, normalize=True), {}),
    "rescom": ("rescom", dict(temperature=0.2, k_pos=1, k_neg=4), {}),
    "rescom_weighted": ("rescom", dict(temperature=0.3, k_pos=2, k_neg=3,
                                       class_weights=torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)),
                        {}),
}


def _case_seed(name):
    return 1000 + sorted(CASES).index(name)


def _local_inputs(name, W, rank):
    loss, kw, ex = CASES[name]
    seed = _case_seed(name)
    x = _feats(W, seed)[rank].clone().requires_grad_(True)
    args, kw = [x], dict(kw)
    kw.setdefault("grad_sync", "sum")
    leaves = {"features": x}
    if loss in ("supcon", "afcl"):
        args.append(None if ex.get("no_labels") else _labels(W, seed)[rank])
        if ex.get("ref"):
            rf, rl = _refs(W, seed)
            kw["ref_features"] = rf[rank].clone().requires_grad_(True)
            leaves["ref_features"] = kw["ref_features"]
            if not ex.get("no_labels"):
                kw["ref_labels"] = rl[rank]
    elif loss == "bcl":
        args.append(_labels(W, seed)[rank])
        p = _prototypes(seed).clone().requires_grad_(True)
        args.append(p)
        leaves["prototypes"] = p
    elif loss == "rescom":
        q, ql = _queue(seed)
        args += [_labels(W, seed)[rank], q, ql]
    return loss, args, kw, leaves


def _global_reference(name, W):
    """Reference loss and gradients on the concatenated batch (the parent computes these)."""
    loss, kw, ex = CASES[name]
    seed = _case_seed(name)
    kw = dict(kw)
    kw.pop("grad_sync", None)
    x = torch.cat(_feats(W, seed), 0).requires_grad_(True)
    args, leaves = [x], {"features": x}
    if loss in ("supcon", "afcl"):
        args.append(None if ex.get("no_labels") else torch.cat(_labels(W, seed)))
        if ex.get("ref"):
            rf, rl = _refs(W, seed)
            kw["ref_features"] = torch.cat(rf).requires_grad_(True)
            leaves["ref_features"] = kw["ref_features"]
            if not ex.get("no_labels"):
                kw["ref_labels"] = torch.cat(rl)
    elif loss == "bcl":
        p = _prototypes(seed).clone().requires_grad_(True)
        args += [torch.cat(_labels(W, seed)), p]
        leaves["prototypes"] = p
    elif loss == "rescom":
        q, ql = _queue(seed)
        args += [torch.cat(_labels(W, seed)), q, ql]
    out = getattr(lf, loss)(*args, backend="reference", **kw)
    g = torch.Generator().manual_seed(5)
    w = torch.rand(out.shape, generator=g, dtype=out.dtype) + 0.5 if out.dim() else torch.ones((), dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), w, {k: v.grad for k, v in leaves.items()}


# ---------------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------------


def _run_case(name, mode, W, rank, group):
    import ltcl_fused.distributed as lfd
    loss, args, kw, leaves = _local_inputs(name, W, rank)
    mode, _, backend = mode.partition("-")
    out = getattr(lfd, loss)(*args, mode=mode, backend=backend or "torch", group=group, **kw)
    if out.dim():  # "none": weight the local rows with the same weights the reference uses on the global rows
        w = torch.rand(_global_rows(name, W), generator=torch.Generator().manual_seed(5), dtype=out.dtype) + 0.5
        w = w[_local_row_index(name, W, rank)]
        (out * w).sum().backward()
    else:
        out.backward()
    return {"loss": out.detach(), "grads": {k: v.grad for k, v in leaves.items()}}


def _global_rows(name, W):
    return V * sum(_sizes(W))


def _local_row_index(name, W, rank):
    """Global view-major row index of every local flattened row (v·B_r + b -> v·B + off_r + b)."""
    sizes = _sizes(W)
    off, B = sum(sizes[:rank]), sum(sizes)
    return torch.tensor([v * B + off + b for v in range(V) for b in range(sizes[rank])])


def _run_gather_trap(W, rank, group):
    """all_gather_rows on [B, V, D] then a view-major flatten: the gradient reaching the gather is strided."""
    from ltcl_fused.distributed import all_gather_rows
    out = {}
    for even in (True, False):  # equal sizes (no padding copy) and uneven sizes
        xs = _trap_feats(W, even)
        x = xs[rank].clone().requires_grad_(True)
        G = all_gather_rows(x, group=group)
        flat = G.transpose(0, 1).reshape(-1, D)
        wt = torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=flat.dtype)
        (flat * wt * (rank + 1)).sum().backward()
        out[even] = {"grad": x.grad, "gathered": G.detach()}
    return out


def _trap_feats(W, even):
    return [torch.randn(4, V, D, generator=torch.Generator().manual_seed(77 + r), dtype=torch.float64)
            for r in range(W)] if even else _feats(W, 77)


def _run_queue(W, rank, group):
    import ltcl_fused.distributed as lfd
    q = lfd.ClassBalancedQueue(5, 3, D, dtype=torch.float64, group=group)
    for step in range(3):
        feats = _feats(W, 500 + step, views=1)[rank][:, 0]
        q.enqueue(feats, _labels(W, 500 + step)[rank])
    return {k: v.clone() for k, v in q.state_dict().items()}


def _run_ddp(W, rank, group):
    """A DDP training step: the averaged parameter gradients must equal one process's on the global batch."""
    import ltcl_fused.distributed as lfd
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    x = _feats(W, 900)[rank]
    out = {}
    for m in MODES:
        ddp.zero_grad()
        z = ddp(x)  # [B_r, V, 4]
        mode, _, backend = m.partition("-")
        lfd.supcon(z, _labels(W, 900)[rank], temperature=0.3, normalize=True, mode=mode,
                   backend=backend or "torch", group=group).backward()
        out[m] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


def _run_errors(W, rank, group):
    import ltcl_fused.distributed as lfd
    x = _feats(W, 1)[rank]
    lab = _labels(W, 1)[rank]
    if rank == 1:
        lab = lab[:-1]  # wrong length on one rank only
    try:
        lfd.supcon(x, lab, backend="torch", group=group)
    except Exception as e:  # noqa: BLE001
        return {"type": type(e).__name__, "msg": str(e)}
    return {"type": None, "msg": ""}


def _worker(rank, port, outdir):
    run_worlds(rank, port, outdir, CASES, MODES, _run_case, (("trap", _run_gather_trap), ("queue", _run_queue), ("ddp", _run_ddp),
                                                                ("errors", _run_errors)))


@pytest.fixture(scope="module")
def results():
    return spawn_results(_worker)


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("W", WORLDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_reference(results, W, mode, name):
    per_rank = [ok(r[(name, mode)]) for r in results(W)]
    ref_loss, _, ref_grads = _global_reference(name, W)
    loss, kw, ex = CASES[name]
    sizes = _sizes(W)
    off = [sum(sizes[:r]) for r in range(W)]
    scale = W if kw.get("grad_sync") == "mean" else 1  # "mean": each rank's share is W times its slice
    for r, res in enumerate(per_rank):
        if ref_loss.dim():
            torch.testing.assert_close(res["loss"], ref_loss[_local_row_index(name, W, r)], atol=ATOL, rtol=1e-9)
        else:
            torch.testing.assert_close(res["loss"], ref_loss, atol=ATOL, rtol=1e-9)
        g = res["grads"]["features"]
        torch.testing.assert_close(g, scale * ref_grads["features"][off[r]: off[r] + sizes[r]], atol=ATOL,
                                   rtol=1e-8)
        if "ref_features" in ref_grads:
            R = [2 + q for q in range(W)]
            ro = sum(R[:r])
            torch.testing.assert_close(res["grads"]["ref_features"], ref_grads["ref_features"][ro: ro + R[r]],
                                       atol=ATOL, rtol=1e-8)
    if "prototypes" in ref_grads:  # replicated parameter: the per-rank shares sum to the exact gradient
        total = sum(res["grads"]["prototypes"] for res in per_rank)
        torch.testing.assert_close(total, ref_grads["prototypes"], atol=ATOL, rtol=1e-8)


@pytest.mark.parametrize("W", WORLDS)
def test_gather_noncontiguous_grad(results, W):
    """The torch 2.13 Gloo trap: a strided gradient at the gathered [B, V, D] output must not corrupt dx."""
    per_rank = [ok(r["trap"]) for r in results(W)]
    for even in (True, False):
        xs = _trap_feats(W, even)
        X = torch.cat(xs, 0).requires_grad_(True)
        flat = X.transpose(0, 1).reshape(-1, D)
        wt = torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=flat.dtype)
        # every rank's loss uses the same weights times (rank + 1): total weight Σ (r + 1)
        (flat * wt * sum(r + 1 for r in range(W))).sum().backward()
        off = 0
        for r, res in enumerate(per_rank):
            torch.testing.assert_close(res[even]["gathered"], X.detach(), atol=0, rtol=0)
            torch.testing.assert_close(res[even]["grad"], X.grad[off: off + xs[r].shape[0]], atol=1e-12,
                                       rtol=1e-12)
            off += xs[r].shape[0]


@pytest.mark.parametrize("W", WORLDS)
def test_queue_same_on_every_rank(results, W):
    per_rank = [ok(r["queue"]) for r in results(W)]
    q = lf.reference.ClassBalancedQueue(5, 3, D, dtype=torch.float64)
    for step in range(3):
        q.enqueue(torch.cat(_feats(W, 500 + step, views=1), 0)[:, 0], torch.cat(_labels(W, 500 + step)))
    for res in per_rank:
        for k, v in q.state_dict().items():
            torch.testing.assert_close(res[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("W", WORLDS)
def test_ddp_step_matches_single_process(results, W):
    """grad_sync="mean" (default) + DDP's gradient averaging = the single-process gradient of the global loss."""
    per_rank = [ok(r["ddp"]) for r in results(W)]
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    z = model(torch.cat(_feats(W, 900), 0))
    lf.supcon(z, torch.cat(_labels(W, 900)), temperature=0.3, normalize=True, backend="reference").backward()
    for res in per_rank:
        for m in MODES:
            for n, p in model.named_parameters():
                torch.testing.assert_close(res[m][n], p.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("W", WORLDS)
def test_bad_input_on_one_rank_raises_everywhere(results, W):
    per_rank = [ok(r["errors"]) for r in results(W)]
    assert per_rank[1]["type"] == "ValueError" and "`labels`" in per_rank[1]["msg"]
    for r, res in enumerate(per_rank):
        if r != 1:
            assert res["type"] == "RuntimeError" and "rank(s) [1]" in res["msg"]


def test_requires_initialised_process_group():
    import ltcl_fused.distributed as lfd
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        lfd.supcon(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))


def test_bad_mode_and_grad_sync_named():
    import ltcl_fused.distributed as lfd
    with pytest.raises(ValueError, match="mode"):
        lfd.supcon(torch.randn(4, 3), mode="allreduce")
    with pytest.raises(ValueError, match="grad_sync"):
        lfd.afcl(torch.randn(4, 3), grad_sync="avg")
    with pytest.raises(ValueError, match="backend"):
        lfd.bcl(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), torch.randn(2, 3), backend="reference")
