"""Calibration: stream activation tensors through observers and turn what they saw into float ranges.

Observers (:mod:`onnxq.calibrate.observers`) keep fixed-size state, so calibration memory is bounded by
the number of observed tensors, never by the number of calibration samples, and the ranges they return
do not depend on how the samples were split into batches.
"""
