"""Score maps for many images and whole slides: inputs, region readers, tissue masks, writers, engines."""
