from .contract import acc_dtype, dense_backward, dense_forward, focal_terms, log1mexp  # noqa: F401
from .function import RowStats, row_stats  # noqa: F401
