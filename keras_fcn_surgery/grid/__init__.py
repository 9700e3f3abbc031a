"""Grid arithmetic: per-axis stride/receptive-field maths, a model's geometry, and exact tile planning."""
