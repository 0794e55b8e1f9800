"""alldetect: acute lymphoblastic leukemia detection in single white-blood-cell images (C-NMC 2019)."""

__version__ = "0.1.0"
