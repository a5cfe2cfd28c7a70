"""The clinic's side: one CT study in, marker probabilities, hematoma mask and volume out."""
