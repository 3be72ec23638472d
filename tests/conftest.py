import os

import pytest
import torch

# No test reaches the Hugging Face Hub: huggingface_hub (and transformers) read this when first imported,
# so a Hub id that is not in the local cache fails at once (lmzoo/interop/hub.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory):
    """A Hub cache holding tiny models transformers and PEFT saved (tests/hub_cache.py)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from tests.hub_cache import build

    return build(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def offline_hub(hub_repos, monkeypatch):
    """huggingface_hub reading ``hub_repos``' cache, offline. It reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at
    import, so its constants are set as well as the environment (which a subprocess reads)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hub_repos.home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_repos.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_repos.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_repos
