"""Validation BPB against training seconds, one line per mini-golf model, from the runs' own logs.

    python bench/minigolf_figure.py bench/logs/minigolf_study03/sotu_full \
        --out studies/03_byte_hnet_vs_byte_gpt/bpb_vs_seconds.png

Reads every <model>_seed<S>.log in the folder (bench/minigolf.py writes them), takes the periodic
`step:S/N val_loss:... val_bpb:... train_time:...ms` lines (validation is off the training clock,
so train_time is the x axis as the runs saw it) and draws each model's mean over its seeds, the
seeds themselves faint. The points are the float model's non-overlapping scores during training;
the table's round trip is the artifact's, after export. Needs matplotlib (optional: for figures only).

    python bench/minigolf_figure.py bench/logs/minigolf_study03/ablation --at-step 200 --base study03_hnet

prints instead each model's validation BPB at one step (equal steps, where the table is at equal
seconds), with --base its difference from that model at the same seed, and the seeds already in
their warmdown at that step (the run's last step less WARMDOWN_ITERS); --write also writes it,
under a line that says how it was made, to the folder's at_step<N>_vs_<base>.md (at_step<N>.md
without --base), so one folder holds a table for each base (the files the READMEs link).

    python bench/minigolf_figure.py bench/logs/minigolf_study03/sotu_full --at-seconds 100 --base study03_gpt

does the same at equal training seconds (the footing the bench's table is on, at the end): each
run's validation BPB where its line crosses that time, linear between the periodic points either
side, and the step it had reached; --write puts it in at_seconds<T>[_vs_<base>].md. Read at a few
times, it shows where in a run one model's lead forms.

    python bench/minigolf_figure.py bench/logs/minigolf_study03/longer_600s --swing 200 --write

prints (and writes to swing.md) how far each run's validation BPB moves from one periodic point to
the next from step 200 on: a measure of how noisy the end of a run is, whatever model it trains.

    python bench/minigolf_figure.py bench/logs/minigolf_study03/lr_1000_steps --schedule 850 --write

prints (and writes to schedule.md) each run's validations from step 850 on with the LR multiplier
the warmdown had reached there, recomputed from the log: which stretch of the training order each
run met at which LR, the thing that moves an endpoint when two runs' warmdowns start apart.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import files  # noqa: E402

LOG = re.compile(r"^(?P<model>.+)_seed(?P<seed>\d+)\.log$")
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:(\S+) train_time:(\d+)ms", re.M)
SETTING = re.compile(r"^([a-z_0-9]+):(\S*)$", re.M)  # the hyperparameter lines a log opens with


def logs(folder: Path) -> dict[str, dict[int, str]]:
    """{model: {seed: log text}} for every <model>_seed<S>.log in a mini-golf logs folder."""
    out: dict = {}
    for path in sorted(folder.glob("*.log")):
        m = LOG.match(path.name)
        if m:
            out.setdefault(m["model"], {})[int(m["seed"])] = path.read_text(encoding="utf-8")
    return out


def settings(text: str) -> dict[str, str]:
    """The `key:value` lines a log prints before its first step (its resolved hyperparameters)."""
    return dict(SETTING.findall(text.split("\nstep:", 1)[0]))


def warmdown_start(text: str) -> int | None:
    """The step a run's warmdown started at: its last validated step (the end) less WARMDOWN_ITERS.
    Exact when ITERATIONS ends the run; under a wall-clock cap the trainer starts the warmdown when
    the time left is WARMDOWN_ITERS mean steps, so this is right to a step or two while the step
    time holds. None if the log does not say WARMDOWN_ITERS or has no validation."""
    w, steps = settings(text).get("warmdown_iters"), VAL.findall(text)
    return max(int(steps[-1][0]) - int(w), 0) if w and steps else None


def warmdown_rule(text: str) -> Callable[[float, float], float] | None:
    """The trainer's warmdown factor (its lr_schedule) as a function of (step, training ms), from a
    log's own settings: linear to 0 over the last WARMDOWN_ITERS steps or, under a wall-clock cap,
    over the time of WARMDOWN_ITERS mean steps before the cap (the mean from the elapsed time at that
    step); the smaller of the two. No LR warmup (the bench runs have none). None if the log does not
    print a setting this needs."""
    hp = settings(text)
    try:
        iterations, warmdown = int(hp["iterations"]), int(hp["warmdown_iters"])
        seconds = float(hp["max_wallclock_seconds"])
        gptq = "int6" in hp["export_formats"].split(",") and int(hp["gptq_calib_batches"]) > 0
        reserve = float(hp["gptq_reserve_seconds"]) if gptq else 0.0
    except (KeyError, ValueError):
        return None
    cap_ms = 1000 * (seconds - reserve) if seconds > 0 else 0.0

    def factor(step: float, elapsed: float) -> float:
        if warmdown <= 0:
            return 1.0
        down = min(max((iterations - step) / warmdown, 0.0), 1.0)
        if cap_ms > 0 and step > 0:
            down = min(down, max(cap_ms - elapsed, 0.0) / (warmdown * elapsed / step))
        return down
    return factor


def lr_multipliers(text: str) -> dict[int, float] | None:
    """{validated step: the warmdown factor the step after it trains at} (warmdown_rule at the log's
    own train_time there); None if the log does not print a setting the rule needs."""
    rule = warmdown_rule(text)
    return None if rule is None else {int(s): rule(int(s), float(ms)) for s, _, ms in VAL.findall(text)}


def validations(folder: Path, texts: dict | None = None) -> dict[str, dict[int, list[tuple[int, float, float]]]]:
    """{model: {seed: [(step, training seconds, val_bpb), ...]}} from a mini-golf logs folder (or its
    logs() already read)."""
    out: dict = {}
    for model, by_seed in (logs(folder) if texts is None else texts).items():
        for seed, text in by_seed.items():
            points = [(int(step), int(ms) / 1000, float(bpb)) for step, bpb, ms in VAL.findall(text)]
            if points:
                out.setdefault(model, {})[seed] = points
    if not out:
        raise SystemExit(f"error: {folder} holds no <model>_seed<S>.log with validation lines (VAL_LOSS_EVERY > 0)")
    return out


def curves(folder: Path) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """{model: {seed: [(training seconds, val_bpb), ...]}}: what the figure draws."""
    return {model: {seed: [(sec, bpb) for _, sec, bpb in points] for seed, points in seeds.items()}
            for model, seeds in validations(folder).items()}


def check_base(folder: Path, base: str | None, models) -> None:
    if base is not None and base not in models:
        raise SystemExit(f"error: --base {base}: no such model in {folder} (have: {', '.join(sorted(models))})")


def at_step(folder: Path, step: int, base: str | None) -> str:
    """A markdown table of each model's validation BPB at `step`, over the seeds that reached it,
    with `base` its difference from that model at the same seed, and which of those seeds were in
    their warmdown by then (a lower LR lowers the loss at once: such a seed is not at equal footing)."""
    texts = logs(folder)
    data = {model: {seed: bpb for seed, points in seeds.items() for s, _, bpb in points if s == step}
            for model, seeds in validations(folder, texts).items()}
    check_base(folder, base, data)

    rows = []
    for model, by_seed in data.items():
        cells = [model, ", ".join(map(str, sorted(by_seed))) or "none",
                 files.spread(list(by_seed.values()), "{:.4f}") if by_seed else "-"]
        if base is not None:
            cells.append("-" if model == base else files.paired(by_seed, data[base]))
        starts = {seed: warmdown_start(texts[model][seed]) for seed in sorted(by_seed)}
        cells.append("?" if None in starts.values() else
                     ", ".join(f"{seed} (from {start})" for seed, start in starts.items() if step > start) or "none")
        rows.append(cells)
    head = ["model", f"seeds at step {step}", f"validation BPB at step {step}"]
    head += [f"minus {base}'s, same seed"] if base is not None else []
    return files.markdown_table(head + ["of those, in the warmdown (from step)"], rows)



def interpolate(points: list[tuple[int, float, float]], seconds: float) -> tuple[float, float] | None:
    """(step, val_bpb) of a run at `seconds` of training, linear between the two validations either
    side of it ([(step, seconds, bpb), ...] in order); None if the run stopped before then."""
    for (s0, t0, b0), (s1, t1, b1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            w = (seconds - t0) / (t1 - t0) if t1 > t0 else 1.0
            return s0 + w * (s1 - s0), b0 + w * (b1 - b0)
    return None


def at_seconds(folder: Path, seconds: float, base: str | None) -> str:
    """A markdown table of each model's validation BPB at `seconds` of training (the bench's own
    footing, equal time, where at_step is equal steps), over the seeds whose runs got that far:
    interpolated between the periodic validations around it, so it is the reading of the figure's
    line there, with the step it falls at and the warmdown factor the trainer's rule gives there (a
    falling LR lowers the loss at once, and a warmdown counted in steps starts earlier in seconds for
    the model with the slower step); with `base` its difference from that model, same seed."""
    texts = logs(folder)
    read = {model: {seed: point for seed, points in seeds.items()
                    if (point := interpolate(points, seconds)) is not None}
            for model, seeds in validations(folder, texts).items()}
    check_base(folder, base, read)
    rows = []
    for model, by_seed in read.items():
        bpb = {seed: b for seed, (_, b) in by_seed.items()}
        rules = {seed: warmdown_rule(texts[model][seed]) for seed in by_seed}
        lr = "-" if not by_seed else "?" if None in rules.values() else files.spread(
            [rules[seed](step, 1000 * seconds) for seed, (step, _) in by_seed.items()], "{:.2f}")
        cells = [model, ", ".join(map(str, sorted(by_seed))) or "none",
                 files.spread([s for s, _ in by_seed.values()], "{:.0f}") if by_seed else "-",
                 files.spread(list(bpb.values()), "{:.4f}") if by_seed else "-", lr]
        if base is not None:
            cells.append("-" if model == base else
                         files.paired(bpb, {seed: b for seed, (_, b) in read[base].items()}))
        rows.append(cells)
    head = ["model", f"seeds at {seconds:g} s", f"step at {seconds:g} s", f"validation BPB at {seconds:g} s",
            "warmdown factor there"]
    return files.markdown_table(head + ([f"minus {base}'s, same seed"] if base is not None else []), rows)


def readout_name(kind: str, n: int, base: str | None) -> str:
    """The file --write puts an at-step or at-seconds table in ('step' or 'seconds'), named after its
    base (a model as its logs name it, so already a file name: 'study03_hnet+SMEAR_GATE-0')."""
    return f"at_{kind}{n}.md" if base is None else f"at_{kind}{n}_vs_{base}.md"


def readout_file(folder: Path, kind: str, n: int, base: str | None) -> str:
    """at_step's or at_seconds' table under the command that makes it: what --write puts in
    readout_name's file."""
    command = f"python bench/minigolf_figure.py {files.shown(folder)} --at-{kind} {n}"
    command += f" --base {base}" if base is not None else ""
    if kind == "step":
        what = (f"the float model's validation BPB at step {n} (the runs' own periodic lines), "
                "mean (min-max) over seeds")
        tail = "; the last column: seeds whose warmdown had started (at their last step less WARMDOWN_ITERS)"
        table = at_step(folder, n, base)
    else:
        what = (f"the float model's validation BPB at {n} s of training, linear between the runs' own "
                "periodic validations either side, the step it falls at and the LR's warmdown factor there "
                "(the trainer's rule applied to the log's settings), mean (min-max) over seeds")
        tail, table = "", at_seconds(folder, n, base)
    what += ", and its difference from the base at the same seed" if base is not None else ""
    return f"`{command}`: {what}{tail}\n\n{table}\n"


def swing(folder: Path, start: int) -> str:
    """Per model, over its seeds: the standard deviation and the largest size of the change from one
    periodic validation to the next, from step `start` on (the end-of-run validation, off the
    interval, left out). Learning moves it a little; a training order that reads one long document
    for many steps moves it a lot, in every arm of a seed together."""
    rows = []
    for model, seeds in validations(folder).items():
        sds, tops, counts = [], [], []
        for points in seeds.values():
            steps = [s for s, _, _ in points]
            every = statistics.mode(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 1 else 0
            regular = [(s, bpb) for s, _, bpb in points if every and s % every == 0 and s >= start]
            changes = [b - a for (s, a), (t, b) in zip(regular, regular[1:]) if t - s == every]
            if len(changes) >= 3:
                sds.append(statistics.stdev(changes))
                tops.append(max(abs(c) for c in changes))
                counts.append(len(changes))
        rows.append([model, str(len(sds)), files.spread(counts, "{:.0f}") if counts else "-",
                     files.spread(sds, "{:.4f}") if sds else "-", files.spread(tops, "{:.4f}") if tops else "-"])
    head = ["model", "seeds", f"changes from step {start}", "sd of the change", "largest change"]
    return files.markdown_table(head, rows)


def swing_file(folder: Path, start: int) -> str:
    return (f"`python bench/minigolf_figure.py {files.shown(folder)} --swing {start}`: the change of each run's "
            "validation BPB (float model) from one periodic point to the next, mean (min-max) over seeds\n\n"
            f"{swing(folder, start)}\n")


def schedule(folder: Path, start: int) -> str:
    """Each run's validations from step `start` on, with the LR multiplier the next step trains at
    and the change from the previous validation: where a run's warmdown met its training order."""
    rows = []
    for model, texts in logs(folder).items():
        for seed, text in sorted(texts.items()):
            factors = lr_multipliers(text)
            points = [(int(s), float(b)) for s, b, _ in VAL.findall(text)]
            for (_, before), (step, bpb) in zip(points, points[1:]):
                if step >= start:
                    lr = "?" if factors is None else f"{factors[step]:.2f}"
                    rows.append([model, str(seed), str(step), lr, f"{bpb:.4f}", f"{bpb - before:+.4f}"])
    head = ["model", "seed", "step", "LR multiplier after it", "validation BPB", "change from the previous point"]
    return files.markdown_table(head, rows)


def schedule_file(folder: Path, start: int) -> str:
    return (f"`python bench/minigolf_figure.py {files.shown(folder)} --schedule {start}`: each run's periodic "
            "validation BPB (float model) from that step on, the warmdown factor the following step trains "
            "at (the trainer's rule applied to the log's own settings and train_time) and the change since "
            "the previous point\n\n"
            f"{schedule(folder, start)}\n")


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
    p.add_argument("--out", type=Path, help="the PNG to write")
    p.add_argument("--title", default="", help="the figure's title (default: the folder's name)")
    p.add_argument("--at-step", type=int, help="print each model's validation BPB at this step instead of drawing")
    p.add_argument("--at-seconds", type=int, metavar="T",
                   help="print each model's validation BPB at T training seconds (interpolated) instead of drawing")
    p.add_argument("--base", help="with --at-step or --at-seconds: a model to subtract, seed by seed")
    p.add_argument("--swing", type=int, metavar="STEP",
                   help="print how far the validation moves between neighbouring points from STEP on")
    p.add_argument("--schedule", type=int, metavar="STEP",
                   help="print each run's validations from STEP on with the LR multiplier they met")
    p.add_argument("--write", action="store_true",
                   help="with --at-step, --at-seconds, --swing or --schedule: also write the folder's "
                        "at_step<N>[_vs_<base>].md, at_seconds<T>[_vs_<base>].md, swing.md or schedule.md")
    args = p.parse_args(argv)
    if args.at_step is not None and args.at_seconds is not None:
        p.error("--at-step and --at-seconds: give one (a table is at equal steps or at equal seconds)")
    if args.base is not None and args.at_step is None and args.at_seconds is None:
        p.error("--base needs --at-step or --at-seconds")
    report = None
    if args.schedule is not None:
        report = schedule_file(args.logs, args.schedule), "schedule.md"
    elif args.swing is not None:
        report = swing_file(args.logs, args.swing), "swing.md"
    elif args.at_step is not None or args.at_seconds is not None:
        kind, n = ("step", args.at_step) if args.at_step is not None else ("seconds", args.at_seconds)
        report = readout_file(args.logs, kind, n, args.base), readout_name(kind, n, args.base)
    if args.write and report is None:
        p.error("--write needs --at-step, --at-seconds, --swing or --schedule")
    if report is not None:
        text, name = report
        print(text, end="")
        if args.write:
            files.write_atomic(args.logs / name, text)
        return 0
    if args.out is None:
        p.error("--out is required to draw the figure")
    data = curves(args.logs)
    draw(data, args.out, args.title or args.logs.name)
    print(f"wrote {args.out}: " + ", ".join(f"{m} ({len(s)} seeds)" for m, s in sorted(data.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
