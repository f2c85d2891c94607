#!/usr/bin/env python3
"""Check ONNX files exported by metac with the reference `onnx` checker.

Usage: check_onnx.py FILE.onnx [FILE.onnx ...]

Every file must pass onnx.checker.check_model(full_check=True) (which also
runs strict shape inference), use only the standard domain, and declare
static shapes on every graph input and output.
"""
import sys

import onnx


def check(path):
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    domains = {o.domain for o in m.opset_import}
    assert domains <= {"", "ai.onnx"}, f"non-standard domains {domains}"
    assert any(o.version >= 17 for o in m.opset_import), "opset below 17"
    for v in list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{v.name} has a dynamic dimension"


def main():
    passed = failed = 0
    for path in sys.argv[1:]:
        try:
            check(path)
            passed += 1
        except Exception as e:  # report every file, then fail
            failed += 1
            print(f"FAIL {path}: {e}")
    print(f"onnx checker: {passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
