import sys
from pathlib import Path

# --import-mode=importlib: the stack helper lives next to the tests, not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
