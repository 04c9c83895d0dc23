"""Shared helpers for the benchmarks. Import this module before anything that imports
`datasets` (the `builder` package does): it points HF_DATASETS_CACHE at a fresh temporary
directory first, so the first run of a benchmark is really cold.

Every benchmark prints ratios measured in one run on one machine. The absolute numbers are
CPU figures on whatever machine ran them: they only mean something relative to each other.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"

_TEMP_DIRS: list[str] = []


def temp_dir(prefix: str) -> str:
    """A temporary directory removed when this process exits."""
    path = tempfile.mkdtemp(prefix=f"eagle3-bench-{prefix}-")
    _TEMP_DIRS.append(path)
    return path


@atexit.register
def _cleanup() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def quiet_env(datasets_cache: str) -> dict:
    """Environment for this process or a child: offline, no progress bars, the given datasets cache."""
    env = dict(os.environ)
    env.update(
        HF_DATASETS_CACHE=datasets_cache,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        EAGLE3_BENCH_DATASETS_CACHE=datasets_cache,  # tells a child's _common that this cache is already fresh
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


# Set before `datasets` is imported by anyone in this process.
if "datasets" in sys.modules:  # pragma: no cover - a misuse of this module
    raise RuntimeError("import benchmarks/_common.py before datasets (or builder)")
_given = os.environ.get("EAGLE3_BENCH_DATASETS_CACHE")
if _given and _given == os.environ.get("HF_DATASETS_CACHE") and Path(_given).is_dir():
    _cache = _given  # a child started by a benchmark with a cache made fresh for it (and removed by the parent)
else:
    _cache = temp_dir("hf-datasets-cache")
os.environ.update({k: v for k, v in quiet_env(_cache).items() if k != "PYTHONPATH"})
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def quiet_libraries() -> None:
    """Silence the progress bars and advisory logs of the libraries (after importing them)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def machine() -> dict:
    """What ran the benchmark (recorded beside every figure)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def sample_chat_lines() -> list[bytes]:
    """The embedded sample conversations (both files, in the order the builder reads them), one JSON line each."""
    from builder.embedded import EMBEDDED_INPUTS

    root = EMBEDDED_INPUTS["sample-chats"]
    lines = []
    for path in sorted(root.glob("*.jsonl")):
        lines += [line for line in path.read_bytes().splitlines() if line.strip()]
    return lines


def write_replicated_jsonl(path: Path, rows: int) -> Path:
    """The sample chats repeated verbatim (nothing varied but repetition) until `rows` lines."""
    lines = sample_chat_lines()
    path = Path(path)
    with open(path, "wb") as f:
        for i in range(rows):
            f.write(lines[i % len(lines)] + b"\n")
    return path


def run_child(args: list[str], env: dict, timeout: float = 600) -> dict:
    """Run `python args...` in a child whose last stdout line is a JSON object; return it."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"benchmark child {args} failed with exit status {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark child {args} printed no JSON result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result.setdefault("child_wall_s", time.perf_counter() - start)
    return result


def write_results(name: str, data: dict, path: str | Path | None = None) -> Path:
    """Write a benchmark's results, with the machine and its load, to `path` (default: results/NAME.json)."""
    path = Path(path) if path else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_average_1_5_15min": load_average(),  # other processes on the machine skew timings
        "note": "ratios are measured in one run on one machine; absolute figures are CPU figures "
        "that only mean something relative to each other",
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table; floats get sensible precision."""

    def cell(value) -> str:
        if isinstance(value, float):
            if value == 0:
                return "0"
            if abs(value) >= 100:
                return f"{value:,.0f}"
            if abs(value) >= 10:
                return f"{value:,.1f}"
            if abs(value) >= 0.01:
                return f"{value:.3f}"
            return f"{value:.2e}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    out = []
    if title:
        out.append(title)
    out.append("  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    out.append("  " + "  ".join("-" * w for w in widths))
    for r in body:
        out.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def load_average() -> list[float]:
    """1/5/15-minute load averages: other processes on the machine skew every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_line() -> str:
    m = machine()
    return (
        f"machine: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores, GPU: {m['gpu']}, torch {m.get('torch', '?')} "
        f"({m.get('torch_threads', '?')} threads); load average now {load_average()[:1]}"
    )
