"""Do the main stage's padding chunks distort its GPTQ Hessians? One checkpoint, two int6 exports.

    python bench/gptq_padding.py runs/<RUN_ID>/checkpoints/step_000600.pt [--out FILE]

The main stage runs over C = TRAIN_SEQ_LEN // CHUNK_DIVISOR chunk positions; past a window's last
kept boundary they are zero padding that no byte reads, yet their activations enter the Hessians
of every main-stage linear (X^T X over all C rows). This script rebuilds the checkpoint's model,
collects the Hessians the trainer's way (collect_hessians), and again with the main stage's rows
past each window's last real chunk left out, then quantises with each, reads both artifacts back
and scores them: int6 round trip, non-overlapping, the whole validation split. Prints a markdown
table. A measurement, not a switch: the trainer is unchanged by it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import files, modules  # noqa: E402

STUDY = "02"


def masked_main_stage(trainer, model):
    """Hooks that make the main stage's linears see zeros on padding rows, and count real rows only."""
    state = {"real": 0, "rows": 0}

    def on_chunk(module, inputs, out):
        state["valid"] = out.probs > 0  # (B, C): real chunks have p >= 0.5, padding 0
        state["real"] += int(state["valid"].sum())
        state["rows"] += state["valid"].numel()

    hooks = [model.chunk.register_forward_hook(on_chunk)]
    for m in model.main.modules():
        if isinstance(m, trainer.CastedLinear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: (args[0] * state["valid"][..., None].to(args[0].dtype),)))
    return hooks, state


def export_and_score(trainer, run, hessians, label: str, out_dir: Path) -> dict:
    state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    payload = trainer.quantize_state_dict(state, "int6", run.hp, hessians, run.data)
    path = out_dir / f"{label}.int6.ptz"
    files.write_atomic(path, trainer.compress(payload, "int6"))
    model = trainer.model_from_payload(trainer.read_artifact(path), run.rt.device)
    res = trainer.evaluate_bpb(model, run.rt, run.hp, run.val_tokens, run.luts)
    return {"label": label, "bpb": res.val_bpb, "bytes": path.stat().st_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    trainer = modules.trainer_of(modules.study_dir(STUDY))
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    names = set(trainer.Hyperparameters.__dataclass_fields__)
    hp = trainer.Hyperparameters(**{k: v for k, v in state["config"].items() if k in names})
    hp.output_dir = str(args.checkpoint.parent.parent / "gptq_padding")
    hp.resume_from, hp.run_id = str(args.checkpoint), "gptq_padding"
    rt = trainer.setup_device(hp)
    run, _ = trainer.build_run(hp, rt)
    trainer.load_checkpoint(run, hp.resume_from)
    rows = [export_and_score(trainer, run, trainer.collect_hessians(run), "every row (the trainer)", run.run_dir)]
    run.loader.stream.load_state(state["loader"])  # the same calibration batches for the second export
    hooks, seen = masked_main_stage(trainer, run.model)
    try:
        hessians = trainer.collect_hessians(run)
    finally:
        for h in hooks:
            h.remove()
    # zeroed rows add nothing to X^T X but were counted in its mean: rescale to the real rows' mean
    fraction = seen["real"] / seen["rows"]
    for key in hessians:
        if key.startswith("main."):
            hessians[key] = hessians[key] / fraction
    rows.append(export_and_score(trainer, run, hessians, "padding rows left out (main stage)", run.run_dir))
    text = (f"`python bench/gptq_padding.py {args.checkpoint}`: {hp.gptq_calib_batches} calibration batches, "
            f"real (not padding) main-stage rows {fraction:.3f}; int6 round trip, non-overlapping\n\n"
            + files.markdown_table(["Hessians", "int6 round-trip BPB", "model bytes"],
                                   [[r["label"], f"{r['bpb']:.5f}", f"{r['bytes']:,}"] for r in rows]) + "\n")
    files.report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
