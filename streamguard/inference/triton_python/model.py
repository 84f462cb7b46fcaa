"""A Triton Python-backend model that runs the ONNX model beside it with ONNX Runtime on the CPU.

For Triton builds without the onnxruntime backend, such as the `tritonserver` bundled in PyPI's nvidia-pytriton,
which the tests and tools/bench_triton.py run on CPU-only machines. Production servers use the onnxruntime or
tensorrt_plan models that `streamguard triton layout` writes beside it. Copied into the repository by that command;
not imported by StreamGuard itself.

Every request of a dynamic batch goes into one ONNX Runtime call (Triton hands the Python backend a list of
requests, not one stacked tensor), so server-side batching saves calls here as it does in the other backends.
"""

import json
import os
import sys
from typing import Any

# The backend's stub runs an embedded interpreter that ignores PYTHONPATH: honour it here, first, so that the
# server's environment (a virtualenv with onnxruntime and numpy<2, which the stub's bindings need) wins over the
# interpreter's own site-packages.
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        options = ort.SessionOptions()
        # As StreamGuard's own CPU backend: few threads, no spinning (scores match it bit for bit).
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "2"))
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(batches)})
        responses, start = [], 0
        for batch in batches:
            end = start + len(batch)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:end], dtype=np.float32))
                       for name, out in zip(self.output_names, outputs)]  # noqa: B905 (stubs for 3.8+)
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = end
        return responses
