"""Stage 3: the site cache (preprocessed once, pseudonymised) and the datasets, splits and loaders over it."""
