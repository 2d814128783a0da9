import sys
from pathlib import Path

import pytest

# Tests import the toys and shared cases as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

from toys import TOYS, Toy  # noqa: E402


@pytest.fixture(params=sorted(TOYS))
def toy(request) -> Toy:
    return TOYS[request.param]
