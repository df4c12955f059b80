"""Triton kernels for harmodt_fast (installed as harmodt_fast.kernels): one op per file, each with its launcher and autograd glue."""
