"""The benchmarks, installed as harmodt_fast.benchmarks (this folder in a source checkout). Each named module runs
as `python -m harmodt_fast.benchmarks.NAME ARGS` or `harmodt-fast bench NAME ARGS`; harmodt_fast/bench.py lists
them. Importing the package imports nothing else."""
