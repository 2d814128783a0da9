import sys
from pathlib import Path

import pytest

# Tests import shared helpers as plain modules: the toys and contract cases here, train_helpers in train/.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "train"))
sys.path.insert(0, str(Path(__file__).parent / "bad_inputs"))

from toys import TOYS, Toy  # noqa: E402


@pytest.fixture(params=sorted(TOYS))
def toy(request) -> Toy:
    return TOYS[request.param]
