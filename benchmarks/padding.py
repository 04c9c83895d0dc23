"""How much of a GPU build's forward is padding, by sort window: the build's own batching
(`row_windows` + `plan_batches`, as `forward.py` runs them) over Llama-3.1-8B and -70B rows in
every format, for windows of 512 MiB (four 128 MiB row groups: the window before it had a
setting of its own) to 8 GiB (`--sort-window-bytes`, default 4 GiB).

Arithmetic, no forward: a row's bytes come from the builder's `Layout`; sample lengths are a
chat-like log-normal (median about 540 tokens, clipped to 16..2048, a fixed seed), with 77% of
tokens loss-masked. Padding = padded batch tokens over real tokens, minus one: the share of
the forward's tokens that are padding. Host memory per build process is at most one window
(the rows wait there until they can be written in build order).

Run: .venv/bin/python benchmarks/padding.py
"""

from __future__ import annotations

import _common  # noqa: F401
import numpy as np
from _common import machine_line, write_results

NAME = "padding"
SAMPLES = 4000
SEQ_LENGTH = 2048
LOSS_SHARE = 0.77
WINDOWS_MIB = (512, 1024, 2048, 4096, 8192)
LEGACY_WINDOW_MIB = 512
TARGETS = {"Llama-3.1-8B": 4096, "Llama-3.1-70B": 8192}  # hidden size; vocab 128256, 3 aux layers
FORMATS = (("probs", 32000), ("probs", 128256), ("topk", 32000), ("hidden", 32000))
BATCHING = ((8, 8 * SEQ_LENGTH), (64, 65536))  # (--batch-size, --max-tokens-per-batch): the defaults, and a big one


def lengths() -> np.ndarray:
    return np.clip(np.random.default_rng(0).lognormal(6.3, 0.8, SAMPLES).astype(int), 16, SEQ_LENGTH)


def padding_share(rows: list[dict], layout, window_bytes: int, batch_size: int, max_tokens: int) -> float:
    from builder.batching import plan_batches, row_windows

    per_token, per_loss = layout.bytes_per_position()
    padded = 0
    for window in row_windows(rows, per_token, per_loss, window_bytes):
        sizes = [r["num_tokens"] for r in window]
        padded += sum(len(b) * max(sizes[i] for i in b) for b in plan_batches(sizes, max_tokens, batch_size))
    return 1 - sum(r["num_tokens"] for r in rows) / padded


def main() -> dict:
    from builder.formats import Layout

    rows = [{"num_tokens": int(n), "num_loss_tokens": int(LOSS_SHARE * n)} for n in lengths()]
    results = []
    for target, hidden in TARGETS.items():
        for target_format, vocab in FORMATS:
            layout = Layout(target_format, "bf16", "bf16", 64, vocab, 3 * hidden, hidden)
            for batch_size, max_tokens in BATCHING:
                shares = {mib: padding_share(rows, layout, mib << 20, batch_size, max_tokens) for mib in WINDOWS_MIB}
                results.append(
                    {
                        "target": target,
                        "format": f"{target_format} Vd {vocab}" if target_format != "topk" else "topk-64",
                        "batch_size": batch_size,
                        "max_tokens_per_batch": max_tokens,
                        "padding_share_by_window_mib": shares,
                    }
                )
    print(machine_line())
    print(f"{NAME}: share of forward tokens that are padding, by sort window ({SAMPLES} chat-like samples, seq {SEQ_LENGTH})")
    print("| target | format | batch size / token budget | " + " | ".join(f"{m} MiB" for m in WINDOWS_MIB) + " |")
    print("|---|---|---|" + "---|" * len(WINDOWS_MIB))
    for r in results:
        cells = " | ".join(f"{r['padding_share_by_window_mib'][m]:.0%}" for m in WINDOWS_MIB)
        print(f"| {r['target']} | {r['format']} | {r['batch_size']} / {r['max_tokens_per_batch']:,} | {cells} |")
    data = {"samples": SAMPLES, "seq_length": SEQ_LENGTH, "loss_share": LOSS_SHARE, "legacy_window_mib": LEGACY_WINDOW_MIB}
    data["cases"] = results
    write_results(NAME, data)
    return data


if __name__ == "__main__":
    main()
