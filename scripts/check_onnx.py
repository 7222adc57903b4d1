#!/usr/bin/env python3
"""Python interop check of an exported model: onnx.checker (full_check) passes, the metadata is there,
and Python onnxruntime reproduces the reference output (written by the Rust test from Candle).

Usage: check_onnx.py MODEL.onnx REFERENCE.json TOLERANCE
REFERENCE.json: {"shape": [B,C,H,W], "x": [...], "t": [...], "y": [...] or null, "eps": [...]} ("eps": the
first output, the velocity for a v-predicting model), and "w": [...] for a student with a guidance input
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    path, ref_path, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    for key in ("diffusion.betas", "diffusion.num_timesteps", "diffusion.image_size", "diffusion.null_class"):
        assert key in meta, f"metadata lacks {key}"
    ref = json.load(open(ref_path))
    f16 = meta.get("diffusion.dtype") == "float16"
    x = np.array(ref["x"], dtype=np.float32).reshape(ref["shape"])
    feeds = {"x": x.astype(np.float16) if f16 else x, "t": np.array(ref["t"], dtype=np.int64)}
    if ref.get("y") is not None:
        feeds["y"] = np.array(ref["y"], dtype=np.int64)
    if ref.get("w") is not None:
        feeds["w"] = np.array(ref["w"], dtype=np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # the first output: eps, or the velocity of a v-predicting model
    (eps,) = sess.run([sess.get_outputs()[0].name], feeds)
    want = np.array(ref["eps"], dtype=np.float32).reshape(ref["shape"])
    rel = float(np.abs(eps.astype(np.float32) - want).max() / max(np.abs(want).max(), 1e-6))
    print(f"{path}: checker ok (full_check), onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"opset {model.opset_import[0].version}, relative error {rel:.2e}")
    if not rel <= tol:
        sys.exit(f"relative error {rel} > {tol}")


if __name__ == "__main__":
    main()
