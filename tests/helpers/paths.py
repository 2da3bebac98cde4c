"""Where the repository and the test fixtures are."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
COMPVIS_FIXTURES = FIXTURES / "compvis"
