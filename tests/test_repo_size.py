"""The tracked tree stays small: it travels to the GPU machine with every call (64 MiB at most,
wheels included) and with every clone. Raw benchmark output stays in bench/results/raw/."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_TRACKED_BYTES = 5 * 2**20


def test_tracked_files_under_5_mb():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    sizes = {
        n.decode(): (ROOT / n.decode()).stat().st_size
        for n in names
        if n and (ROOT / n.decode()).is_file()
    }
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert total < MAX_TRACKED_BYTES, (
        f"tracked files hold {total / 2**20:.1f} MiB; largest {largest}"
    )
    raw = [n for n in sizes if n.startswith("bench/results/raw/")]
    assert not raw, f"raw benchmark output is tracked: {raw[:5]}"
