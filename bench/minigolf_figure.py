"""Validation BPB against training seconds, one line per mini-golf model, from the runs' own logs.

    python bench/minigolf_figure.py bench/logs/study03_sotu_full --out studies/03_byte_hnet_vs_byte_gpt/bpb_vs_seconds.png

Reads every <model>_seed<S>.log in the folder (bench/minigolf.py writes them), takes the periodic
`step:S/N val_loss:... val_bpb:... train_time:...ms` lines (validation is off the training clock,
so train_time is the x axis as the runs saw it) and draws each model's mean over its seeds, the
seeds themselves faint. The points are the float model's non-overlapping scores during training;
the table's round trip is the artifact's, after export. Needs matplotlib (optional: for figures only).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

LOG = re.compile(r"^(?P<model>.+)_seed(?P<seed>\d+)\.log$")
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:(\S+) train_time:(\d+)ms", re.M)


def curves(folder: Path) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """{model: {seed: [(training seconds, val_bpb), ...]}} from a mini-golf logs folder."""
    out: dict = {}
    for path in sorted(folder.glob("*.log")):
        m = LOG.match(path.name)
        if not m:
            continue
        points = [(int(ms) / 1000, float(bpb)) for _, bpb, ms in VAL.findall(path.read_text(encoding="utf-8"))]
        if points:
            out.setdefault(m["model"], {})[int(m["seed"])] = points
    if not out:
        raise SystemExit(f"error: {folder} holds no <model>_seed<S>.log with validation lines (VAL_LOSS_EVERY > 0)")
    return out


def mean_curve(seeds: dict[int, list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Point i of the mean: the seeds' i-th validations (the same step of each), averaged."""
    n = min(len(p) for p in seeds.values())
    return [(statistics.mean(p[i][0] for p in seeds.values()), statistics.mean(p[i][1] for p in seeds.values()))
            for i in range(n)]


def draw(data: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (model, seeds) in enumerate(sorted(data.items())):
        color = f"C{i}"
        for points in seeds.values():
            ax.plot(*zip(*points), color=color, alpha=0.25, linewidth=0.8)
        ax.plot(*zip(*mean_curve(seeds)), color=color, linewidth=2, marker="o", markersize=3,
                label=f"{model} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    ax.set_xlabel("training seconds (validation off the clock)")
    ax.set_ylabel("validation BPB (float model, non-overlapping)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    low = min(b for seeds in data.values() for p in seeds.values() for _, b in p)
    ax.set_ylim(low - 0.05, low + 1.2)  # the first validations are far above: keep the race in view
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", type=Path, help="a bench/minigolf.py --logs folder")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default="", help="the figure's title (default: the folder's name)")
    args = p.parse_args(argv)
    data = curves(args.logs)
    draw(data, args.out, args.title or args.logs.name)
    print(f"wrote {args.out}: " + ", ".join(f"{m} ({len(s)} seeds)" for m, s in sorted(data.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
