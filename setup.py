"""Build for harmodt_fast.

- `harmodt_fast/` is the Python package; the Triton kernels in `kernels/` ship inside it as `harmodt_fast.kernels`
  and the benchmarks in `benchmarks/` as `harmodt_fast.benchmarks` (`harmodt-fast bench NAME`).
- The C++ sources in `csrc/` become the extension `harmodt_fast._C` when torch is importable at build time
  (`pip install --no-build-isolation .`). Without torch at build time nothing is compiled here and
  `harmodt_fast/_ext.py` compiles the same sources on first use, with ninja, into the user's cache folder.
  The sources are shipped as package data (`harmodt_fast/_csrc`) for that purpose.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

packages = find_packages(include=["harmodt_fast", "harmodt_fast.*"]) + [
    "harmodt_fast.kernels", "harmodt_fast.benchmarks", "harmodt_fast._csrc"]
package_dir = {"harmodt_fast.kernels": "kernels", "harmodt_fast.benchmarks": "benchmarks", "harmodt_fast._csrc": "csrc"}
package_data = {"harmodt_fast._csrc": ["*.cpp", "*.h", "*.cu", "*.cuh"]}

ext_modules = []
cmdclass = {}
try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # isolated build: the extension is compiled on first use instead
    pass
else:
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    extra = {"cxx": ["-O3", "-fopenmp", "-std=c++17"]}
    ext_modules.append(
        CppExtension("harmodt_fast._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
