"""Stage 4: local two-stage training, DP-SGD and evaluation on the site's own patients."""
