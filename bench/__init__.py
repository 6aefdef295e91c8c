"""Benchmarks of dykaf-lab. Each module answers one question (its docstring says which) and runs as
``python bench/NAME.py`` or ``python -m bench.NAME`` from the repository root; ``--help`` gives its
options. Current figures and the command behind each: BENCHMARKS.md. Tests of the scripts themselves
live in tests/bench/; a benchmark never imports tests/.
"""
