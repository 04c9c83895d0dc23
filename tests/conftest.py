"""Test setup: no network, a private Hugging Face cache per session, tests/ importable."""

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
# NeMo Automodel sits in a site folder of its own (see the Makefile), off the project's path so that
# builds never import its extras; the tests that compare with NeMo's own code import it from there.
NEMO_SITE = Path(sys.prefix) / "nemo-site"
if NEMO_SITE.is_dir():
    sys.path.append(str(NEMO_SITE))
# SpecForge too (see the Makefile); the `specforge_site` fixture puts it first on the path for the
# tests that hand an export to SpecForge's own code.
SPECFORGE_SITE = Path(sys.prefix) / "specforge-site"

# One torch thread per test process, set before torch loads: `make test` runs a pytest worker per core,
# and the tiny targets gain nothing from more threads, which would only contend; processes tests start
# inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def private_hf_cache(tmp_path_factory):
    """Keep `datasets` map caches of one test run away from the user's (and other runs')."""
    cache = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(cache)
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    import datasets.config

    datasets.config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
    yield


@pytest.fixture(scope="session")
def specforge_site():
    """SpecForge's site folder first on the path while the tests that use it run (`import specforge`
    inside them). Missing, it fails the test: `make test` installs it, and a check of SpecForge's
    hand-off that silently did not run would pass for the wrong reason."""
    if not (SPECFORGE_SITE / "specforge-0.2.0.dist-info").is_dir():  # the version the Makefile pins
        pytest.fail(
            f"SpecForge 0.2.0 is not installed in {SPECFORGE_SITE}; expected it there for the SpecForge hand-off tests. "
            f"Run `make test` (it installs it), or `{sys.executable} -m pip install --no-deps --target {SPECFORGE_SITE} specforge==0.2.0`"
        )
    sys.path.insert(0, str(SPECFORGE_SITE))
    yield SPECFORGE_SITE
    sys.path.remove(str(SPECFORGE_SITE))
