"""``convert``: NIfTI affine maps voxels to RAS+ world coordinates as the DICOM tags say."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom

from client.ingest.convert import convert_study
from tests.helpers.data import head_phantom, write_series


def test_converted_nifti_voxels_sit_at_their_dicom_positions(tmp_path) -> None:
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    row, col = (1.0, 0.0, 0.0), (0.0, c, s)
    hu = head_phantom((4, 10, 12))
    paths = write_series(tmp_path / "study", hu, spacing=(3.0, 0.5, 0.6), row_dir=row, col_dir=col, reverse=True)
    out = convert_study(tmp_path / "study", tmp_path / "out" / "ct.nii.gz")
    img = nib.load(str(out))
    data = np.asarray(img.dataobj)
    assert data.shape == (12, 10, 4)  # [column, row, slice] like dcm2niix
    for p in paths:
        ds = pydicom.dcmread(p)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        rdir, cdir = np.array(row), np.array(col)
        # voxel (column 3, row 2) of this slice, in LPS from the tags alone
        lps = ipp + 3 * 0.6 * rdir + 2 * 0.5 * cdir
        ras = lps * [-1, -1, 1]
        ijk = np.linalg.inv(img.affine) @ [*ras, 1]
        i, j, k = np.round(ijk[:3]).astype(int)
        np.testing.assert_allclose(ijk[:3], [i, j, k], atol=1e-3)
        assert (i, j) == (3, 2)
        stored = np.frombuffer(ds.PixelData, dtype="<i2").reshape(10, 12)
        assert data[i, j, k] == stored[2, 3] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert img.header.get_qform(coded=True)[1] == 1 and img.header.get_sform(coded=True)[1] == 1
