"""matplotlib for the PNGs of `skipdit analyze` and `benchmarks/` (the optional `[plots]` extra)."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a RuntimeError that names the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("drawing PNGs needs matplotlib: pip install 'comfyui-skipdit[plots]'") from e
    return plt


def save(fig, path: str) -> None:
    """Lay out, write at 120 dpi and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
