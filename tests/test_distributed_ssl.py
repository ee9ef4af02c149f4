"""ltcl_fused.distributed.dcl / hcl / bayesian_cl / mttv against the single-process reference on the
concatenated batch, with real Gloo processes on loopback.

One spawn of 3 processes runs every case in every mode on the world of 3 ranks and then on the subgroup
of global ranks [1, 2] as a world of 2 (group rank 0 = global rank 1: the rank mapping of ``group=``).
Local batches are uneven and one rank holds a single pair; the Bayesian cases use half-integer features
with rows repeated across ranks (exact ties between ranks, and a -0.0 / +0.0 pair), one of them with
row groups of 2 anchors (several rank sweeps). Float64 throughout, so tolerances are tight. Modes:
gather and ring, each on the torch and the cpu engine.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

import ltcl_fused as lf

from _dist import WORLDS, ok, run_worlds, spawn_results

D = 4
MODES = ("gather", "gather-cpu", "ring", "ring-cpu")
ATOL, RTOL = 1e-10, 1e-9


def _pairs(W):
    return [2, 1, 4] if W == 3 else [3, 1]  # uneven; one rank holds a single pair


def _two_view_data(W, seed, ties):
    """Per-rank (z1_r, z2_r); ties: half-integer rows from a small pool (repeats across ranks, ±0 rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    if ties:
        pool = torch.randint(-2, 3, (5, D), generator=g).double() / 2
        pool[0] = -0.0
        pool[1] = 0.0
    for r, B in enumerate(_pairs(W)):
        if ties:
            z1 = pool[torch.randint(0, 5, (B,), generator=g)].clone()
            z2 = pool[torch.randint(0, 5, (B,), generator=g)].clone()
        else:
            base = torch.randn(B, D, generator=g, dtype=torch.float64)
            z1 = base + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
            z2 = base + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
        out.append((z1, z2))
    return out


def _mttv_data(W, seed):
    """Per-rank interleaved pairs [2P_r, D]: partners close, so most positives pass the filter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for P in _pairs(W):
        base = torch.randn(P, 1, D, generator=g, dtype=torch.float64)
        out.append((base + 0.4 * torch.randn(P, 2, D, generator=g, dtype=torch.float64)).reshape(2 * P, D))
    return out


#: name -> (loss, kwargs, extras); kwargs without grad_sync are run with grad_sync="sum"
CASES = {
    "dcl": ("dcl", dict(temperature=0.5, tau_plus=0.1), {}),
    "dcl_simclr_sum": ("dcl", dict(temperature=0.4, debiased=False, reduction="sum"), {}),
    "dcl_none": ("dcl", dict(temperature=0.5, tau_plus=0.2, reduction="none"), {}),
    "hcl": ("hcl", dict(temperature=0.5, tau_plus=0.1, beta=1.0), {}),
    "hcl_gradmean": ("hcl", dict(temperature=0.3, beta=0.5, grad_sync="mean"), {}),
    "bayes": ("bayesian_cl", dict(), {}),
    "bayes_ties": ("bayesian_cl", dict(alpha=0.7, beta=0.6, tau_plus=0.2), {"ties": True}),
    "bayes_ties_none": ("bayesian_cl", dict(alpha=0.9, beta=0.8, reduction="none", temperature=0.3),
                        {"ties": True}),
    "bayes_row_groups": ("bayesian_cl", dict(alpha=0.6, beta=0.9), {"ties": True, "rank_budget": 2}),
    "mttv_both": ("mttv", dict(lower=0.1, upper=0.9, temperature=0.3), {}),
    "mttv_low_official": ("mttv", dict(filter="low", lower=0.2, official_self_term=True, temperature=0.5), {}),
    "mttv_none": ("mttv", dict(lower=0.15, upper=0.95, reduction="none"), {}),
    "mttv_gradmean": ("mttv", dict(lower=0.05, upper=0.99, grad_sync="mean"), {}),
}


def _seed(name):
    return 300 + sorted(CASES).index(name)


def _global_sizes(name, W):
    """Per-rank row counts of the loss's flattened rows (2B_r for two views, 2P_r for mttv)."""
    return [2 * p for p in _pairs(W)]


def _local_row_index(name, W, rank):
    """Global row of every local row of the per-row output ("none")."""
    P = _pairs(W)
    off, B = sum(P[:rank]), sum(P)
    if CASES[name][0] == "mttv":
        return torch.arange(2 * off, 2 * off + 2 * P[rank])
    return torch.tensor([off + b for b in range(P[rank])] + [B + off + b for b in range(P[rank])])


def _weights(n):
    return torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5


def _global_reference(name, W):
    """Reference value and gradients on the concatenated batch (computed in the parent)."""
    loss, kw, ex = CASES[name]
    kw = {k: v for k, v in kw.items() if k != "grad_sync"}
    if loss == "mttv":
        E = torch.cat(_mttv_data(W, _seed(name))).requires_grad_(True)
        out = lf.mttv(E, backend="reference", **kw)
        leaves = {"embeddings": E}
    else:
        parts = _two_view_data(W, _seed(name), ex.get("ties", False))
        z1 = torch.cat([p[0] for p in parts]).requires_grad_(True)
        z2 = torch.cat([p[1] for p in parts]).requires_grad_(True)
        out = getattr(lf, loss)(z1, z2, backend="reference", **kw)
        leaves = {"z1": z1, "z2": z2}
    (out * _weights(out.numel()).reshape(out.shape) if out.dim() else out).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


# ---------------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------------


def _run_case(name, mode, W, rank, group):
    import ltcl_fused.distributed as lfd
    from ltcl_fused.distributed import ssl_ring
    loss, kw, ex = CASES[name]
    kw = dict(kw)
    kw.setdefault("grad_sync", "sum")
    mode, _, backend = mode.partition("-")
    budget = ssl_ring.RANK_BUDGET_ELEMENTS
    if "rank_budget" in ex:  # rows per group = budget // global columns
        ssl_ring.RANK_BUDGET_ELEMENTS = ex["rank_budget"] * sum(_global_sizes(name, W))
    try:
        if loss == "mttv":
            E = _mttv_data(W, _seed(name))[rank].clone().requires_grad_(True)
            out = lfd.mttv(E, mode=mode, backend=backend or "torch", group=group, **kw)
            leaves = {"embeddings": E}
        else:
            z1, z2 = (t.clone().requires_grad_(True) for t in _two_view_data(W, _seed(name), ex.get("ties", False))[rank])
            out = getattr(lfd, loss)(z1, z2, mode=mode, backend=backend or "torch", group=group, **kw)
            leaves = {"z1": z1, "z2": z2}
        if out.dim():
            n_glob = sum(_global_sizes(name, W))
            (out * _weights(n_glob)[_local_row_index(name, W, rank)]).sum().backward()
        else:
            out.backward()
    finally:
        ssl_ring.RANK_BUDGET_ELEMENTS = budget
    return {"loss": out.detach(), "grads": {k: v.grad for k, v in leaves.items()}}


def _run_errors(W, rank, group):
    """Bad or disagreeing inputs: every rank raises, none hangs."""
    import ltcl_fused.distributed as lfd
    out = {}
    z1, z2 = _two_view_data(W, 1, False)[rank]
    E = _mttv_data(W, 2)[rank]
    calls = {
        # a bad input on one rank (wrong z2 shape on rank 1)
        "shape": lambda: lfd.dcl(z1, z2[:, :-1] if rank == 1 else z2, group=group, backend="torch"),
        # an odd number of rows on the last rank
        "odd": lambda: lfd.mttv(E[:-1] if rank == W - 1 else E, group=group, backend="torch", mode="ring"),
        # a bad hyperparameter on rank 0 only
        "alpha": lambda: lfd.bayesian_cl(z1, z2, alpha=0.2 if rank == 0 else 0.5, group=group, backend="torch"),
        # a hyperparameter that differs between ranks (valid everywhere)
        "temperature": lambda: lfd.hcl(z1, z2, temperature=0.5 if rank == 0 else 0.4, group=group,
                                       backend="torch", mode="ring"),
        # modes that differ: ring on one rank, gather on the others
        "mode": lambda: lfd.bayesian_cl(z1, z2, mode="ring" if rank == 0 else "gather", group=group,
                                        backend="torch"),
        "bad_mode": lambda: lfd.dcl(z1, z2, mode="allgather" if rank == 1 else "ring", group=group),
    }
    for key, call in calls.items():
        try:
            call()
            out[key] = {"type": None, "msg": ""}
        except Exception as e:  # noqa: BLE001
            out[key] = {"type": type(e).__name__, "msg": str(e)}
    # after all that, the group still works: a good call succeeds on every rank
    out["after"] = float(lfd.dcl(z1, z2, group=group, backend="torch", mode="ring"))
    return out


def _run_ddp(W, rank, group):
    """DDP steps (grad_sync="mean", the default): averaged parameter gradients = the single-process ones."""
    import ltcl_fused.distributed as lfd
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 3).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    z1, z2 = _two_view_data(W, 900, False)[rank]
    out = {}
    for loss in ("hcl", "bayesian_cl"):
        for m in ("gather", "ring-cpu"):
            ddp.zero_grad()
            mode, _, backend = m.partition("-")
            getattr(lfd, loss)(ddp(z1), ddp(z2), mode=mode, backend=backend or "torch", group=group).backward()
            out[(loss, m)] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


def _run_double_backward(W, rank, group):
    """A second derivative through a ring loss raises the first-order error (never a silent wrong number)."""
    import ltcl_fused.distributed as lfd
    z1, z2 = (t.clone().requires_grad_(True) for t in _two_view_data(W, 3, False)[rank])
    out = {}
    for loss in ("dcl", "bayesian_cl"):
        for m in ("ring", "ring-cpu"):
            mode, _, backend = m.partition("-")
            v = getattr(lfd, loss)(z1, z2, mode=mode, backend=backend or "torch", group=group)
            g, = torch.autograd.grad(v, z1, create_graph=True)  # first order with a graph: fine
            try:
                torch.autograd.grad(g.sum(), z1, allow_unused=True)
                out[(loss, m)] = None
            except RuntimeError as e:
                out[(loss, m)] = str(e)
    return out


def _worker(rank, port, outdir):
    run_worlds(rank, port, outdir, CASES, MODES, _run_case, (("errors", _run_errors), ("ddp", _run_ddp),
                                                                ("double_backward", _run_double_backward)))


@pytest.fixture(scope="module")
def results():
    from ltcl_fused import ext
    reason = ext.unavailable_reason()  # build once here, not in three workers at a time
    if reason is not None:
        pytest.fail(f"the C++ extension does not build here: {reason}")
    return spawn_results(_worker)


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("W", WORLDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_reference(results, W, mode, name):
    per_rank = [ok(r[(name, mode)]) for r in results(W)]
    ref_loss, ref_grads = _global_reference(name, W)
    loss, kw, _ = CASES[name]
    scale = W if kw.get("grad_sync") == "mean" else 1  # "mean": each rank's share is W times its slice
    P = _pairs(W)
    for r, res in enumerate(per_rank):
        want = ref_loss[_local_row_index(name, W, r)] if ref_loss.dim() else ref_loss
        torch.testing.assert_close(res["loss"], want, atol=ATOL, rtol=RTOL)
        off = sum(P[:r])
        if loss == "mttv":
            sl = {"embeddings": slice(2 * off, 2 * off + 2 * P[r])}
        else:
            sl = {"z1": slice(off, off + P[r]), "z2": slice(off, off + P[r])}
        for k, s in sl.items():
            torch.testing.assert_close(res["grads"][k], scale * ref_grads[k][s], atol=ATOL, rtol=1e-8,
                                       msg=lambda m: f"rank {r} d{k}: {m}")


def test_ties_cases_have_ties_across_ranks():
    """The Bayesian tie cases really tie values held on different ranks (else they test nothing new)."""
    for name in ("bayes_ties", "bayes_row_groups"):
        for W in WORLDS:
            parts = _two_view_data(W, _seed(name), True)
            rows = [{tuple(x.tolist()) for x in torch.cat(p)} for p in parts]
            assert any(rows[a] & rows[b] for a in range(W) for b in range(a + 1, W)), (name, W)


def test_row_group_case_uses_several_groups():
    from ltcl_fused.distributed import ssl_ring
    for W in WORLDS:
        cols = sum(_global_sizes("bayes_row_groups", W))
        rows_per_group = (CASES["bayes_row_groups"][2]["rank_budget"] * cols) // cols
        assert max(_global_sizes("bayes_row_groups", W)) > 2 * rows_per_group  # >= 3 groups on the largest rank
        assert ssl_ring.RANK_BUDGET_ELEMENTS >= cols  # the default: one group here


@pytest.mark.parametrize("W", WORLDS)
def test_bad_or_disagreeing_inputs_raise_on_every_rank(results, W):
    per_rank = [ok(r["errors"]) for r in results(W)]
    last = W - 1
    for r, res in enumerate(per_rank):
        # one bad input: ValueError naming it where it is, RuntimeError naming that rank elsewhere
        for key, bad, what in (("shape", 1, "`z2` has feature dimension 3"), ("odd", last, "even number of rows"),
                               ("alpha", 0, "alpha"), ("bad_mode", 1, "mode")):
            if r == bad:
                assert res[key]["type"] == "ValueError" and what in res[key]["msg"], (key, res[key])
            else:
                assert res[key]["type"] == "RuntimeError" and f"rank(s) [{bad}]" in res[key]["msg"], (key, res[key])
        # valid but different on different ranks: the same ValueError everywhere
        assert res["temperature"]["type"] == "ValueError" and "`temperature` differs" in res["temperature"]["msg"]
        assert res["mode"]["type"] == "ValueError" and "`mode` differs" in res["mode"]["msg"]
        assert res["after"] == per_rank[0]["after"]


@pytest.mark.parametrize("W", WORLDS)
def test_ddp_step_matches_single_process(results, W):
    per_rank = [ok(r["ddp"]) for r in results(W)]
    for loss in ("hcl", "bayesian_cl"):
        torch.manual_seed(0)
        model = torch.nn.Linear(D, 3).double()
        parts = _two_view_data(W, 900, False)
        z1, z2 = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        getattr(lf, loss)(model(z1), model(z2), backend="reference").backward()
        for res in per_rank:
            for m in ("gather", "ring-cpu"):
                for n, p in model.named_parameters():
                    torch.testing.assert_close(res[(loss, m)][n], p.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("W", WORLDS)
def test_second_derivative_through_the_ring_raises(results, W):
    for res in (ok(r["double_backward"]) for r in results(W)):
        for key, msg in res.items():
            assert msg is not None and "first-order gradients only" in msg, (key, msg)


def test_requires_initialised_process_group_and_names_bad_arguments():
    import ltcl_fused.distributed as lfd
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    z = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        lfd.dcl(z, z)
    with pytest.raises(ValueError, match="mode"):
        lfd.hcl(z, z, mode="allreduce")
    with pytest.raises(ValueError, match="grad_sync"):
        lfd.bayesian_cl(z, z, grad_sync="avg")
    with pytest.raises(ValueError, match="backend"):
        lfd.mttv(torch.randn(4, 4), backend="reference")
    with pytest.raises(ValueError, match="`embeddings`"):
        lfd.mttv(torch.randn(3, 4))
