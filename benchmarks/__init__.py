"""The benchmarks: the bench (``python -m benchmarks``, ``featurebeam bench``, ``make bench``) and its
sections. They import the jobs and the building blocks; nothing in ``pipeline/`` or ``transforms/``
imports them.

- ``bench``: the driver, and the throughput, memory and quality measurements;
- ``plan``: the planner on synthetic tables of up to 10M rows;
- ``neighbors``: all-rows k-NN, exact and through the faiss index;
- ``torch_reference``: the PyTorch row of the hub section, a script run by another Python.
"""
