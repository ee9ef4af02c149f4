"""Issue 11: a training step syncs with the host at most once (check_finite=True) and not at all with
check_finite=False. Every host read of a tensor's values in the Python layer is recorded, forward and
backward, for every loss on the torch, cpu and (interpreted) triton backends. The C++ ops and the Triton
host code behind a torch.library op are opaque here (one op each)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ltcl_fused as lf
from loss_cases import FUSED, LOSSES, cases, problem, require

aten = torch.ops.aten
#: aten ops whose result (a Python scalar or a data-dependent shape) needs the tensor's values on the host
_READ_OPS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.nonzero_static,
             aten.argwhere, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
             aten.unique_consecutive, aten.unique_dim_consecutive, aten.bincount, aten.repeat_interleave,
             aten.histc, aten.allclose}
_BOOL_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
#: Tensor methods that read values without an aten op (tolist, numpy, printing)
_PY_READS = {"tolist", "numpy", "__array__", "__dlpack__", "__repr__", "__format__", "__str__"}


class _DispatchReads(TorchDispatchMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is aten.repeat_interleave and not isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                                torch.Tensor):
            pass  # an integer repeat count is a shape, not a value
        elif packet in _READ_OPS:
            self.log.append(str(func))
        elif packet in _BOOL_INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx):
                self.log.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


class _FunctionReads(TorchFunctionMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _PY_READS:
            self.log.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def host_reads(step):
    """The host reads of ``step()`` (a list of op names)."""
    log = []
    with _FunctionReads(log), _DispatchReads(log):
        step()
    return log


def test_the_recorder_sees_every_kind_of_read():
    x = torch.randn(4, 3)

    def reads():
        bool(x.sum() > 0), int(x.argmax()), float(x.max()), x[0, 0].item(), x.tolist(), x[x > 0], x.nonzero()
        torch.bincount(torch.tensor([0, 1])), torch.unique(torch.tensor([0, 1]))

    assert len(host_reads(reads)) == 9

    class _ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            float(g.sum())
            return g * 2

    y = x.clone().requires_grad_()
    assert host_reads(lambda: _ReadsInBackward.apply(y).sum().backward()) == ["aten._local_scalar_dense.default"]
    assert host_reads(lambda: (x @ x.T).logsumexp(1).sum()) == []


@pytest.mark.parametrize("check_finite", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
def test_one_training_step_reads_the_host_at_most_once(loss, backend, check_finite):
    require(backend)
    x, extra = problem(torch.float32)
    call = cases(extra)[loss]
    call(x, backend=backend)  # warm-up: builds/loads the backend outside the recording
    f = x.clone().requires_grad_()
    reads = host_reads(lambda: call(f, backend=backend, check_finite=check_finite).backward())
    assert len(reads) <= (1 if check_finite else 0), reads
    assert f.grad is not None and bool(torch.isfinite(f.grad).all())


@pytest.mark.parametrize("check_finite", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("backend", FUSED)
def test_hard_pair_mining_reads_the_host_at_most_once(backend, check_finite):
    require(backend)
    g = torch.Generator().manual_seed(1)
    A, K = torch.randn(7, 5, generator=g), torch.randn(20, 5, generator=g)
    al, kl = torch.arange(7) % 3, torch.arange(20) % 3
    lf.hard_pair_mining(A, al, K, kl, k_pos=2, k_neg=4, backend=backend)
    reads = host_reads(lambda: lf.hard_pair_mining(A, al, K, kl, k_pos=2, k_neg=4, backend=backend,
                                                   check_finite=check_finite))
    assert len(reads) <= (1 if check_finite else 0), reads


@pytest.mark.parametrize("check_finite", [True, False], ids=["checked", "unchecked"])
def test_siamese_balanced_softmax_and_queue_read_at_most_once(check_finite):
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    reads = host_reads(lambda: lf.siamese_balanced_softmax([logits[:3], logits[3:]], [y[:3], y[3:]], [5, 3, 1],
                                                           check_finite=check_finite).backward())
    assert len(reads) <= (1 if check_finite else 0), reads
    q = lf.ClassBalancedQueue(3, 2, 4)
    feats = torch.randn(7, 4)
    labs = torch.tensor([0, 2, 2, 2, 1, 0, 2])
    assert len(host_reads(lambda: q.enqueue(feats, labs))) <= 1  # the label-range check
