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


def pytest_collection_modifyitems(config, items):
    """Exhaustive matrices are marked ``slow``; every one of them has a reduced always-run counterpart,
    so the default run (and .ci/run) stays within minutes on 2 cores. ``--runslow`` runs everything."""
    if config.getoption("--runslow") or os.environ.get("SPARSECOMP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow matrix: run with --runslow or SPARSECOMP_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
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
