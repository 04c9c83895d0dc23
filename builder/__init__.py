"""eagle3-cache: build, share and stream EAGLE-3 draft-training supervision caches."""

__version__ = "0.1.0"

from .supervision import TargetSupervision, compute_target_distribution  # noqa: E402

__all__ = ["__version__", "compute_target_distribution", "TargetSupervision", "load_cache", "BuildConfig", "build"]


def __getattr__(name):  # heavy imports (datasets, transformers) only when asked for
    if name == "load_cache":
        from .reader import load_cache

        return load_cache
    if name == "BuildConfig":
        from .config import BuildConfig

        return BuildConfig
    if name == "build":
        from .pipeline import build

        return build
    raise AttributeError(name)
