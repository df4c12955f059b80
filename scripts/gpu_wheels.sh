#!/usr/bin/env bash
# Downloads into .whl/ the wheels the GPU machine lacks for the GPU run's evaluation stage (it has no package
# registry; Python 3.12 there): Meta-World and what it needs beyond that machine's own packages. gpu_run.sh
# installs them from .whl/ (ignored by git) when metaworld is missing; name .whl in the run's carry (46 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "metaworld==3.1.1" "gymnasium==1.4.0" "mujoco==3.3.0" "farama-notifications==0.0.6" \
  "glfw==2.11.0" "pyopengl==3.1.10"
ls -la .whl
