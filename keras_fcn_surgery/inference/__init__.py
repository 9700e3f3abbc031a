"""Running FCNs on images: dense score maps (whole or tiled), the sliding-window baseline, heatmap pictures."""
