"""Files in and out: loading model files with clear errors, and atomic writes that never leave partial output."""
