"""The one layer between onnxq and ONNX Runtime: what it can run (kernel table)."""
