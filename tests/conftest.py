import os

import pytest
import torch

# `make test` runs two pytest-xdist workers; each takes its share of the cores (one each on two cores).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


# The modules whose tests read the session's trained models (tests/stages/conftest.py): one worker runs them
# all, so the models are trained once. Another module using them is still right, only slower.
TRAINED_MODEL_MODULES = {"tests/stages/test_sft.py", "tests/stages/test_grpo.py",
                         "tests/stages/test_preference_stages.py", "tests/stages/test_eval_stages.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s two workers (pytest-xdist): a module's tests stay on one worker (its module-scoped
    fixtures are built once), and the TRAINED_MODEL_MODULES share one."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "trained models" if module in TRAINED_MODEL_MODULES else module

    return ByModule(config, log)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (two threads on two shared cores mostly wait on each other);
    the crash tests' subprocesses use one thread as well. Autouse in tests/train and tests/stages."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
