"""File formats: the official descriptor files (HDF5 / raw ``.pt``), pickles, checkpoints, and
atomic writes, read and written as the official code does."""
