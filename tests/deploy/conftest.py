"""The deploy tests read the repository's own artifacts; nothing here starts a container."""

from __future__ import annotations

import sys
from pathlib import Path

# --import-mode=importlib keeps test folders off sys.path; the helpers beside this file are
# imported by name from the test modules.
sys.path.insert(0, str(Path(__file__).parent))
