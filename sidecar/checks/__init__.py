"""The checks of `fork-sidecar doctor` (sidecar/doctor.py runs them), one module per part of the setup."""
