import sys
from pathlib import Path

# --import-mode=importlib: the shared fakes live in tests/router, which is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "router"))
