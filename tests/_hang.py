"""The one wall-clock limit the suite may use: a hang guard.

No test passes or fails by elapsed time. A subprocess, a process pool or a collective that could hang
forever gets ``HANG_GUARD_S`` as a safety net only. A correct run on a slow or busy machine never comes
near it (the slowest guarded step, a cold Triton codegen sweep or C++ extension build on two loaded
cores, takes minutes), so reaching it means a real hang, and the test then fails instead of blocking CI.
Where the code under test takes a time limit of its own (the benchmark sweep's ``--time-limit``, the
demo's ``timeout``) a test that is not about that limit passes this value too.
"""
HANG_GUARD_S = 2 * 3600
