"""The latency plot of a bench result (``kvmiso bench --plot``, ``kvmiso report``); needs
matplotlib, an optional extra."""

from __future__ import annotations

from typing import Any

from .results import BenchResult


def plot(result: BenchResult, path: str) -> None:
    """The distribution of every row's round trips as an empirical CDF (log time axis), one
    panel for the floors and one per CPL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[Any, list] = {}
    for r in result.results:
        if r.samples:
            groups.setdefault(r.cpl, []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 4.5 * len(groups)), squeeze=False)
    for ax, (cpl, rows) in zip(axes[:, 0], groups.items()):
        for r in rows:
            xs = sorted(v / 1000 for v in r.samples)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{r.kind} ({r.path})", drawstyle="steps-post")
        ax.set_xscale("log")
        ax.set_xlabel("µs per round trip (per iteration for the in-kernel kinds)")
        ax.set_ylabel("fraction of samples")
        ax.set_title("floors" if cpl is None else f"guest at CPL{cpl}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"kvmiso bench: {result.host.get('vendor')} on {result.host.get('cpu')}, {result.created}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
