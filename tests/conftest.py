"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """Every test runs toy-sized models, which are fastest on one thread: a second thread's
    synchronisation costs more than it saves, and badly so on a busy 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
