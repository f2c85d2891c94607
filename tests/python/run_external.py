"""Load an ONNX model that keeps its tensors as external data from its file
with ONNX Runtime's Python API (which reads the data file itself), run it on
x = arange, and print the output's values, one per line.

Usage: python3 run_external.py MODEL.onnx ROWS COLS
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort

path, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = onnx.load(path, load_external_data=False)
external = [t for n in m.graph.node for a in n.attribute if a.t.data_location == 1 for t in [a.t]]
assert external, "no tensor is stored externally"
onnx.checker.check_model(path)
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols) / (rows * cols)
(y,) = s.run(None, {"x": x})
print("\n".join(repr(float(v)) for v in y.reshape(-1)))
