"""Stage 1 of the site pipeline: read a site folder (DICOM or CT-ICH layout) into HU volumes, masks and labels."""
