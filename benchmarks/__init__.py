"""The benchmark of lightning-repair: the paper's experiment on Fashion-MNIST against its peers.

``python -m benchmarks.repair --help`` runs it; ``benchmarks/README.md`` says what it measures and how.
Importing this package loads nothing heavy: :mod:`benchmarks.metrics` needs only NumPy.
"""
