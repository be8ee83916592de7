"""The DICOM SCP: C-ECHO and C-STORE, storing durably and nothing else."""
