"""The io wing: files on disk, geometry, CT and label volumes, DICOM SEG, the readers above them."""
