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


@pytest.fixture
def random_stand_ins(monkeypatch):
    """Call it to make every skipped module's stand-in and every left-out modulation chunk random instead of
    zeros, for the rest of the test: a recipe whose skips are all dead must not notice."""

    def enable(chunks: bool = True):
        from hicache import hooks

        g = torch.Generator().manual_seed(1)

        def noisy(self, module_name):
            out = tuple(None if s is None else torch.randn(s[0], generator=g).to(s[1]) for s in self.specs)
            return out[0] if self.is_tensor else out

        monkeypatch.setattr(hooks.SkipState, "zeros", noisy)
        if chunks:
            monkeypatch.setattr(hooks.LiveChunksHook, "dead_chunks",
                                lambda self, shape, dtype, device: torch.randn(shape, generator=g).to(dtype))

    return enable
