"""When does a router find word starts, and does it keep them? Alignment at every checkpoint of a run.

    python bench/router_trajectory.py runs/<run>          # a run trained with CHECKPOINT_EVERY=K

Rebuilds the model from the config its checkpoints carry, loads each checkpoints/step_*.pt into
it and measures the boundaries (boundaries.py, float weights) on the first
--tokens validation tokens. Prints one markdown table: step, epochs of the training split read,
bytes per chunk, word-start precision and recall, precision one byte before and after, and how
much of the router's q/k int6 rounding zeroes (what a run on fake int6 sees of them). Writes it
to <run>/trajectory.md (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import boundaries  # noqa: E402
from harness import files, modules, runs  # noqa: E402


def trajectory(run_dir: Path, study: Path, tokens: int) -> list[dict]:
    import torch

    trainer = modules.trainer_of(study)
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    if not checkpoints:
        raise SystemExit(f"error: {run_dir}/checkpoints has no step_*.pt (train with CHECKPOINT_EVERY=K)")
    device = torch.device("cpu")
    config = torch.load(checkpoints[0], map_location=device, weights_only=True)["config"]  # the run's resolved config
    names = set(trainer.Hyperparameters.__dataclass_fields__)
    hp = trainer.Hyperparameters(**{k: v for k, v in config.items() if k in names})
    if not hp.is_hnet:
        raise SystemExit(f"error: {run_dir} trained a plain GPT (OUTER_LAYERS=0): it has no router")
    model, val, train_tokens = trainer.HNet(hp).eval(), trainer.load_validation(hp).tokens, runs.train_tokens(hp.data_path)
    rows = []
    for path in checkpoints:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        b = boundaries.analyse(trainer, model, hp, val, device, tokens, shifts=0)
        rows.append({"step": state["step"], "epochs": state["step"] * hp.train_batch_tokens / train_tokens,
                     **{k: b[k] for k in ("tokens_per_chunk", "precision", "recall",
                                          "precision_shift_minus1", "precision_shift_plus1")},
                     "router_zeroed": router_zeroed(trainer, model, hp)})
    return rows


def router_zeroed(trainer, model, hp) -> float:
    """The share of the router's q/k off-diagonal weights that int6 rounding (late QAT's forward, per
    row, its scale floor as configured) sends to exactly 0: while it is near 1, a run on fake int6
    compares its encoder states through the identity, whatever its float q/k learned."""
    import torch

    zeroed = total = 0
    for lin in (model.routing.q_proj, model.routing.k_proj):
        q, _ = trainer.quantize_int6_rows(lin.weight.detach(), bool(hp.quant_scale_floor))
        off = ~torch.eye(q.size(0), dtype=torch.bool)
        zeroed += int((q[off] == 0).sum())
        total += int(off.sum())
    return zeroed / total


def table(rows: list[dict]) -> str:
    head = ["step", "epochs", "bytes/chunk", "precision", "recall", "precision -1", "precision +1",
            "router q/k off-diagonal at int6 0"]
    return files.markdown_table(head, [[r["step"], f"{r['epochs']:.2f}", f"{r['tokens_per_chunk']:.2f}",
                                        f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                                        f"{r['precision_shift_minus1']:.3f}", f"{r['precision_shift_plus1']:.3f}",
                                        f"{r['router_zeroed']:.3f}"] for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--study", type=Path, default=ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024")
    p.add_argument("--tokens", type=int, default=100_000, help="validation tokens measured per checkpoint")
    p.add_argument("--out", type=Path, help="default: <run_dir>/trajectory.md")
    args = p.parse_args(argv)
    if not (args.run_dir / "train.log").is_file():
        p.error(f"{args.run_dir}: no train.log (expected a run folder)")
    text = f"`{args.run_dir}`: the float router's boundaries at each checkpoint\n\n" + table(
        trajectory(args.run_dir, args.study, args.tokens)) + "\n"
    out = args.out or args.run_dir / "trajectory.md"
    files.write_atomic(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
