"""Getting models out: one checked export pipeline for SavedModel and ONNX, preprocessing, TensorBoard graphs."""
