"""Draws docs/icon.png, the pack's registry icon (256 x 256): a stack of transformer blocks whose shallow and
deep blocks are joined by long skip arcs (U-Net style), the middle blocks faded (what Skip-Cache skips).

    python docs/make_icon.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Arc, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("icon.png")
BLOCKS = 8  # four long skips: block i joins block 7 - i
CACHED = range(2, 6)  # the middle blocks a cached step does not run (depth k = 2)


def main() -> None:
    fig = plt.figure(figsize=(2.56, 2.56), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 256)
    ax.set_ylim(0, 256)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((8, 8), 240, 240, boxstyle="round,pad=0,rounding_size=40", color="#1d2b3a"))
    width, gap, top = 22, 4.5, 186
    xs = [20 + i * (width + gap) for i in range(BLOCKS)]
    for i, x in enumerate(xs):
        height = 130 - 10 * min(i, BLOCKS - 1 - i)  # deeper blocks shorter: the U
        color = "#3b556e" if i in CACHED else "#ffb347"
        ax.add_patch(FancyBboxPatch((x, top - height), width, height, boxstyle="round,pad=0,rounding_size=5", color=color))
    for i in range(BLOCKS // 2):
        left, right = xs[i] + width / 2, xs[BLOCKS - 1 - i] + width / 2
        ax.add_patch(Arc(((left + right) / 2, top + 2), right - left, 2 * (6 + 9 * (BLOCKS // 2 - i)), theta1=0, theta2=180,
                         color="#7fdbff", linewidth=3.2))
    ax.text(128, 28, "Skip-DiT", color="white", ha="center", va="center", fontsize=22, fontweight="bold")
    fig.savefig(OUT, dpi=100, facecolor="none", transparent=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
