#!/usr/bin/env python3
"""Engine build recipe: the same as `streamguard engine build` (see engines/BUILD.md).

    python tools/build_engine.py streamguard-sbi --precision fp16 --max-batch 64
    python tools/build_engine.py streamguard-sbi --precision int8 --calibration ../shared/data/real_faces

Exit status: 0 built or reused, 1 the build failed, 2 a bad model or flag, or this machine cannot build (no GPU,
TensorRT or cuda-python), with a message that says which and how to install it.
"""

import sys

from streamguard.cli import app

if __name__ == "__main__":
    app(["engine", "build", *sys.argv[1:]])
