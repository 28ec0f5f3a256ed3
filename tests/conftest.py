import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

torch.set_num_threads(2)

# lowering reads the per-machine prefetch plan (backends/tvm/calibrate.py) from this cache: tests use
# an empty one of their own, never a developer's calibrated plan
os.environ["SPARSECOMP_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsecomp-test-cache-")
atexit.register(shutil.rmtree, os.environ["SPARSECOMP_CACHE_DIR"], True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the exhaustive @pytest.mark.slow matrices (or set SPARSECOMP_SLOW=1)")
    parser.addoption("--slow-stride", type=int, default=0,
                     help="run every N-th slow test (sorted by test id, a fixed sample); .ci/run uses 4")


def pytest_collection_modifyitems(config, items):
    """Exhaustive matrices are marked ``slow`` and skipped by default. ``--runslow`` runs all of them;
    ``--slow-stride N`` (what ``.ci/run`` does, with N = 4) runs every N-th of them in test-id order, a
    fixed sample that spreads over every matrix, so CI runs real slow cases, not only the reduced
    always-run counterparts that most matrices have."""
    if config.getoption("--runslow") or os.environ.get("SPARSECOMP_SLOW") == "1":
        return
    stride = config.getoption("--slow-stride")
    slow = sorted((item for item in items if "slow" in item.keywords), key=lambda item: item.nodeid)
    chosen = {item.nodeid for item in slow[::stride]} if stride > 0 else set()
    skip = pytest.mark.skip(reason="slow matrix: run with --runslow or SPARSECOMP_SLOW=1")
    for item in slow:
        if item.nodeid not in chosen:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet_torch_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


@pytest.fixture(scope="session")
def bytelm_tiny():
    """The tests' trained byte-level Llama (sparsecomp.testing.bytelm, size "tiny"): trained once (~20 s)
    and cached in ~/.cache/sparsecomp/bytelm (or $SPARSECOMP_BYTELM_CACHE), not in the per-session cache."""
    from pathlib import Path

    from sparsecomp.testing import bytelm

    cache = os.environ.get("SPARSECOMP_BYTELM_CACHE") or Path.home() / ".cache" / "sparsecomp" / "bytelm"
    return bytelm.load_or_train("tiny", cache)
