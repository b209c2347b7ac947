"""Decoding speed of an H-Net, with and without the key/value cache, as a markdown table.

    python bench/bench_decode.py                       # the CPU demo's model (random weights), 2 cores
    python bench/bench_decode.py --artifact runs/<RUN_ID>/final_model.int6.ptz    # a trained model's real chunks
    python bench/bench_decode.py --out bench/logs/bench_decode/cpu.md

Samples the same continuation both ways (generate.py: the cached incremental path, and the full
forward per token over the window padded to TRAIN_SEQ_LEN) and reports bytes a second, and how
many main-stage positions the cached path computed per byte: an H-Net's main stage advances once
a chunk, so at inference it costs 1 / (bytes per chunk) of a plain GPT's per byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate  # noqa: E402
from harness import files, modules  # noqa: E402

PROMPT = "Mr. Speaker, Mr. Vice President, Members of Congress, my fellow Americans: "


def load(args):
    if args.artifact is None:  # the demo's model at initialisation
        study = modules.study_dir("02")
        env, _ = modules.run_env(study, "cpu_demo", args.overrides)
        trainer = modules.trainer_of(study)
        hp, _ = trainer.Hyperparameters.from_env({k: v for k, v in env.items() if k not in ("DATA_PATH",)})
        torch.manual_seed(0)
        return trainer, trainer.HNet(hp).eval(), hp, "cpu_demo at initialisation"
    payload = files.read_payload(args.artifact)
    trainer = modules.trainer_of(ROOT / "studies" / payload["trainer"]["study_file"].split("/")[0])
    payload = files.checked_payload(trainer, payload, args.artifact)
    names = set(trainer.Hyperparameters.__dataclass_fields__)
    hp = trainer.Hyperparameters(**{k: v for k, v in payload["config"].items() if k in names})
    return trainer, trainer.model_from_payload(payload, torch.device("cpu")), hp, str(args.artifact)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, help="a trained artifact (default: the demo's model at init)")
    p.add_argument("--bytes", type=int, default=200, help="bytes written with the cache")
    p.add_argument("--slow-bytes", type=int, default=40, help="bytes written without it")
    p.add_argument("--out", type=Path)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for the demo's model (no artifact)")
    args = p.parse_intermixed_args(argv)
    trainer, model, hp, what = load(args)
    rows = []
    for cache, n in ((True, args.bytes), (False, args.slow_bytes)):
        r = generate.report(trainer, model, hp, PROMPT, n, 0.8, 40, 0, cache=cache)
        per_byte = f"{r['main_steps'] / r['bytes']:.3f}" if cache and hp.is_hnet else "-"
        rows.append(["key/value cache, one main-stage step a chunk" if cache else "full forward per token",
                     str(r["bytes"]), f"{r['seconds']:.4f}", f"{r['bytes_per_s']:,.1f}", per_byte])
    speedup = float(rows[0][3].replace(",", "")) / float(rows[1][3].replace(",", ""))
    text = (f"`python bench/bench_decode.py {' '.join(sys.argv[1:] if argv is None else argv)}`: {what}, "
            f"{hp.num_layers}x{hp.model_dim}, window {hp.train_seq_len}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; temperature 0.8, top-k 40, seed 0\n\n"
            + files.markdown_table(["decoding", "bytes", "seconds", "bytes/s", "main-stage steps per byte"], rows)
            + f"\n\ncached / full forward: {speedup:.1f}x\n")
    files.report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
