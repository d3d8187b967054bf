"""The session's DDP process pool (the hypothesis profiles are in ``profiles.py``)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import profiles  # noqa: F401 - registers the profiles
from .ddp_pool import DDPPool


@pytest.fixture(scope="session")
def ddp_pool() -> Iterator[DDPPool]:
    pool = DDPPool()  # the processes start with the first DDP case
    yield pool
    pool.close()
