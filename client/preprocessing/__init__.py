"""Stage 2: the paper's preprocessing of an HU volume (window, denoise, skull strip, centre, resize)."""
