"""backend="cpu" / "cuda": the C++/CUDA extension (placeholder until the extension lands)."""
from .base import Engine


class CPUEngine(Engine):
    name = "cpu"
    ops = frozenset()
    planned = "the C++/CUDA extension, issue #4"

    def unavailable_reason(self, device):
        return None


class CUDAEngine(CPUEngine):
    name = "cuda"
