"""The model's imports: msrec_dist.model reaches neither msrec_dist.data, msrec_dist.distributed nor
msrec_dist.training (not even indirectly), and the specs it shares with the data layer
(msrec_dist/features.py) and its config (msrec_dist/model/config.py) load without torch or pyarrow.
Checked in a fresh interpreter, where sys.modules holds only what these imports pulled in."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import json, sys
import msrec_dist.features, msrec_dist.model.config
light = sorted(m for m in ("torch", "pyarrow", "torchrec") if m in sys.modules)
light += sorted(m for m in sys.modules if m.startswith("msrec_dist.data"))
import msrec_dist.model.zoo
outside = sorted(m for m in sys.modules if m.startswith(("msrec_dist.data", "msrec_dist.distributed",
                                                         "msrec_dist.training", "msrec_dist.config")))
print(json.dumps({"light": light, "outside": outside}))
"""


def test_model_imports_no_data_distributed_or_training():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"light": [], "outside": []}
