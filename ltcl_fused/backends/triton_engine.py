"""backend="triton": fused Triton kernels (placeholder until the Triton engine lands)."""
from .base import Engine


class TritonEngine(Engine):
    name = "triton"
    ops = frozenset()
    planned = "the Triton fused engine, issue #3"

    def unavailable_reason(self, device):
        return None
