"""What every rendered report must satisfy: each PNG under report/ is a real, non-blank image and
report.html references each of them (and nothing else)."""
from __future__ import annotations

import os
import re

import numpy as np
from matplotlib.image import imread


def check_report(out: str) -> list[str]:
    """Asserts the above for <out>/report.html; returns the PNG names."""
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        page = f.read()
    pngs = sorted(os.listdir(os.path.join(out, "report")))
    assert pngs and all(p.endswith(".png") for p in pngs), pngs
    for name in pngs:
        image = imread(os.path.join(out, "report", name))  # [H, W, 4] floats in 0..1
        assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0, (name, image.shape)
        assert np.ptp(image[..., :3]) > 0, f"{name} is one colour"
    referenced = sorted(os.path.basename(src) for src in re.findall(r'<img src="report/([^"]+)"', page))
    assert referenced == pngs, (referenced, pngs)
    return pngs
