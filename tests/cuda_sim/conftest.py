"""tests/cuda_sim: glm5's CUDA kernels run on a CPU simulator (cuda_sim.h); extensions: sim_build.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))  # the kernel tests' cases and makers
