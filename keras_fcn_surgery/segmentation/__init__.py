"""From classifier to segmenter: FCN-32s/16s/8s built on a converted classifier, aligned by its geometry."""
