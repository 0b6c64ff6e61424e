"""Using a trained model: scores, calibration, attention maps and predictions."""
