"""The code passes ruff with pyflakes and bugbear (ruff.toml): every zip() says whether its lengths must match,
no closure reads a loop variable late, no name is unused."""
import subprocess
import sys
from pathlib import Path


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
