"""One command that checks a GPU machine: ``python -m ltcl_fused.gpu_check --out DIR`` (docs/gpu.md).

It runs with the torch and Triton installed there (no network, no pip) within an 8-minute budget:
every backend that can run (triton, cuda, torch) × every loss × bf16/fp16/fp32/fp64 × several D and N
against ``backend="reference"``; a large-index case (N·D > 2³¹); a side stream, a CUDA graph, torch.compile
and the host syncs per step; forward+backward timings as multiples of one N×N×D ``torch.mm``; the largest N
of an afcl step. Outputs: ``DIR/gpu_check.json``, ``DIR/gpu_check.csv``, ``DIR/summary.md``, plots. The exit
code is non-zero when a correctness case failed. ``--dry-run`` runs the same code on CPU tensors under the
Triton interpreter with tiny shapes (about a minute): tests/test_gpu_check.py keeps the kit from rotting.

Modules: ``cases`` (profiles, inputs, the plan), ``correctness`` (tolerance rules, large-index case),
``behaviour`` (streams, graphs, compile, syncs), ``timing``, ``device`` (what differs between the GPU and
the dry run), ``machine`` (versions, CUDA toolkit, build environment), ``worker`` (runs one group of cases),
``runner`` (the parent: probe, build, phases, budget), ``report`` (JSON, CSV, summary.md, plots).
"""
