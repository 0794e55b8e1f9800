"""alldetect: acute lymphoblastic leukemia detection in single white-blood-cell images (C-NMC 2019)."""

import os

__version__ = "0.1.0"

# albumentations asks PyPI for its latest version at import: slow or a warning offline, and never needed here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
