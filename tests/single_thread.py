"""A module-scoped autouse fixture for the token-by-token tests on real models: one intra-op thread.

On a shared 2-core machine, two OpenMP threads competing with other processes wait on each other
for milliseconds in every small op (attention over one query took 11 ms with two threads, 0.01 ms
with one), which makes teacher-forced and decoding passes many times slower. Import it into a test
module to use it there:

    from single_thread import one_thread  # noqa: F401
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
