"""Score a Parameter Golf artifact: BPB after the round trip, the 16,000,000-byte check, boundaries.

    python eval_bpb.py runs/<RUN_ID>/final_model.int6.ptz [--data DIR] [--tokenizer PATH]
        [--sliding/--no-sliding] [--stride N] [--dynamic-cap] [--json OUT] [--trainer PATH]
    torchrun --standalone --nproc_per_node=8 eval_bpb.py ARTIFACT ...

The artifact records the study trainer that made it (study folder, file, sha256), its whole
config, and fingerprints of its tokenizer and validation split. This script imports that
trainer from this repository's studies/ (never a path taken from the artifact; --trainer names
another file you trust) and reuses its model, loader, dequantiser and BPB code. On CPU the
number it prints is the trainer's final line to the last digit; on CUDA the trainer scores its
torch.compile'd model and this script the eager one, so the two agree to float rounding (about
1e-6 BPB), not bit for bit. Any number of processes may evaluate. Exit codes: 0 ok, 2 bad input
(corrupt artifact, tokenizer or validation data not the artifact's), 3 trainer changed since
the artifact was made, 4 artifact over the size cap, 5 a loss that is not finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import boundaries  # noqa: E402  (the analysis lives in its own module)
from harness import files  # noqa: E402
from harness.modules import import_file  # noqa: E402

read_payload = files.read_payload


def find_trainer(record: dict, override: Path | None) -> Path:
    """The study trainer named by the artifact, looked up in this repository's studies/ by folder
    and file name only (an artifact must not choose which file is executed), or --trainer."""
    if override is not None:
        if not override.is_file():
            raise ValueError(f"--trainer {override}: no such file")
        return override.resolve()
    folder, _, name = str(record.get("study_file", "")).partition("/")
    studies = {d.name for d in (ROOT / "studies").iterdir() if d.is_dir()}
    candidate = ROOT / "studies" / folder / name
    if folder not in studies or "/" in name or not name.endswith(".py") or not candidate.is_file():
        raise ValueError(f"the artifact names trainer {record.get('study_file')!r}, which is not a study "
                         f"trainer in {ROOT / 'studies'}; pass --trainer PATH to use a file you trust")
    return candidate


def data_mismatches(recorded: dict, current: dict) -> list[str]:
    """What differs between the tokenizer and validation split an artifact was made with and the
    ones about to score it."""
    out = []
    if recorded.get("tokenizer") != current["tokenizer"]:
        out.append(f"tokenizer: artifact {recorded.get('tokenizer')}, now {current['tokenizer']}")
    old, new = recorded.get("val", {}), current["val"]
    for key in ("shards", "tokens", "sha256"):
        if old.get(key) != new[key]:
            out.append(f"validation {key}: artifact {old.get(key)}, now {new[key]}")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--data", help="dataset folder with fineweb_val_*.bin (default: the run's DATA_PATH)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the run's TOKENIZER_PATH)")
    p.add_argument("--sliding", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the sliding-window evaluation (default on)")
    p.add_argument("--stride", type=int, help="sliding stride in tokens (default: the run's EVAL_STRIDE)")
    p.add_argument("--dynamic-cap", action="store_true", help="also evaluate with the per-batch chunk cap")
    p.add_argument("--val-max-tokens", type=int, help="score only this many validation tokens (quick checks)")
    p.add_argument("--boundaries", action=argparse.BooleanOptionalAction, default=True,
                   help="report boundary statistics for an H-Net (default on; see boundaries.py)")
    p.add_argument("--boundary-tokens", type=int, default=200_000, help="validation tokens the statistics read")
    p.add_argument("--html", type=Path, help="write a self-contained page of the chunks and statistics here")
    p.add_argument("--compare", type=Path,
                   help="a second model beside the first: another artifact (e.g. sp1024 vs byte260), or this run's "
                        "float final_model.pt or a checkpoint (then boundary flips float vs quantised are counted)")
    p.add_argument("--trainer", type=Path, help="score with this trainer file instead of the study's own")
    p.add_argument("--ignore-hash", action="store_true", help="accept a trainer edited since the artifact was made")
    p.add_argument("--ignore-mismatch", action="store_true",
                   help="score with a tokenizer or validation split other than the artifact's")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    g = p.add_argument_group("sampling (instead of scoring; needs no validation data)")
    g.add_argument("--sample", metavar="PROMPT", help="continue PROMPT and print it with the router's chunks marked")
    g.add_argument("--bytes", type=int, default=200, help="bytes to write (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens; 0: all (default 40)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the full forward for every token (the slow reference)")
    return p.parse_args(argv)


class EvalError(ValueError):
    """A refusal with its exit code (3 trainer changed, 5 not finite); plain ValueErrors exit 2."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.code = code


def open_artifact(path: Path, args, overrides: dict):
    """(payload, trainer module, trainer path, its sha256, config) of an artifact, every check done."""
    payload = read_payload(path)
    trainer_path = find_trainer(payload["trainer"], args.trainer)
    sha = hashlib.sha256(trainer_path.read_bytes()).hexdigest()
    if sha != payload["trainer"]["sha256"] and not args.ignore_hash:
        raise EvalError(f"{trainer_path} changed since the artifact was made (sha256 {sha[:12]} != "
                        f"{payload['trainer']['sha256'][:12]}); pass --ignore-hash to score it anyway", 3)
    trainer = import_file(trainer_path)
    payload = files.checked_payload(trainer, payload, path)
    config = dict(payload["config"])
    config.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(trainer.Hyperparameters)}
    hp = trainer.Hyperparameters(**{k: v for k, v in config.items() if k in known})
    hp.check()
    return payload, trainer, trainer_path, sha, hp


def evaluate(args) -> tuple[dict, int]:
    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path is not None and not path.resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: folder {path.resolve().parent} does not exist")
    if args.compare is not None and not args.compare.is_file():
        raise ValueError(f"--compare {args.compare}: no such file")
    overrides = {"data_path": args.data, "tokenizer_path": args.tokenizer, "eval_stride": args.stride,
                 "val_max_tokens": args.val_max_tokens}
    payload, trainer, trainer_path, sha, hp = open_artifact(args.artifact, args, overrides)
    if args.sample is not None:
        return write_sample(args, payload, trainer, hp)
    code, model_bytes = len(trainer_path.read_bytes()), args.artifact.stat().st_size
    results = {"artifact": str(args.artifact), "trainer": str(trainer_path), "trainer_sha256": sha,
               "format": payload["format"],
               "size": {"code_bytes": code, "model_bytes": model_bytes, "total_bytes": code + model_bytes,
                        "cap_bytes": trainer.SIZE_CAP_BYTES, "headroom": trainer.SIZE_CAP_BYTES - code - model_bytes}}
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"artifact: {args.artifact} ({payload['format']}); trainer {os.path.relpath(trainer_path)} "
              f"(sha256 {sha[:12]})")
        print(size_line(results["size"]), flush=True)  # the verdict comes before the long evaluation
    rt = trainer.setup_device(hp, train=False)
    val = trainer.load_validation(hp)
    results["data_warnings"] = val.warnings
    mismatches = data_mismatches(payload.get("data") or {}, val.fingerprint)
    if mismatches and not args.ignore_mismatch:
        raise ValueError("the data does not match the artifact's (pass --ignore-mismatch to score anyway):\n  "
                         + "\n  ".join(mismatches))
    results["data_mismatches"] = mismatches
    model = trainer.model_from_payload(payload, rt.device)
    luts = trainer.build_byte_luts(hp, rt.device)
    try:
        results["roundtrip"] = trainer.evaluate_bpb(model, rt, hp, val.tokens, luts)._asdict()
        # Study 01's trainer has neither: it scores non-overlapping windows, always with the dynamic cap.
        if args.sliding and hasattr(hp, "eval_stride"):
            results["sliding"] = trainer.evaluate_bpb(model, rt, hp, val.tokens, luts, stride=hp.eval_stride)._asdict()
            results["sliding"]["stride"] = hp.eval_stride
        if args.dynamic_cap and hp.is_hnet and hasattr(hp, "chunk_divisor"):
            results["dynamic_cap"] = trainer.evaluate_bpb(model, rt, hp, val.tokens, luts, dynamic_cap=True)._asdict()
    except trainer.NonFiniteScore as e:
        raise EvalError(f"{args.artifact}: {e}", 5) from None
    if hp.is_hnet and (args.boundaries or args.html) and rt.master:
        analyse_boundaries(args, results, (trainer, model, hp, val.tokens, rt.device))
    return results, (4 if results["size"]["headroom"] < 0 else 0)


def write_sample(args, payload, trainer, hp) -> tuple[dict, int]:
    """--sample: the artifact's model continues the prompt (generate.py); no scores."""
    import torch

    import generate

    if args.bytes < 1:
        raise ValueError(f"--bytes {args.bytes}: must be at least 1")
    if hp.uses_sentencepiece and not os.path.isfile(hp.tokenizer_path):
        raise ValueError(f"TOKENIZER_PATH={hp.tokenizer_path}: not found; pass --tokenizer PATH to decode sp ids")
    model = trainer.model_from_payload(payload, torch.device("cpu"))
    r = generate.report(trainer, model, hp, args.sample, args.bytes, args.temperature, args.top_k, args.seed,
                        cache=not args.no_cache)
    return {"artifact": str(args.artifact), "sample": r}, 0


def analyse_boundaries(args, results: dict, main: tuple) -> None:
    """boundaries.analyse on the model (and on --compare's), and the --html page of both."""
    import torch

    trainer, model, hp, val_tokens, device = main
    title = f"{args.artifact.name} ({'sp%d' % hp.vocab_size if hp.uses_sentencepiece else 'byte260'})"
    models = [(title, trainer, model, hp, val_tokens)]
    float_model = None
    if args.compare is not None:
        if args.compare.read_bytes()[:2] == b"PK":  # this run's float final_model.pt, or one of its checkpoints
            float_model = trainer.HNet(hp).to(device)
            try:
                state = torch.load(args.compare, map_location=device, weights_only=True)
                float_model.load_state_dict(state["model"] if "model" in state else state)
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"--compare {args.compare}: not a state dict or checkpoint of this model: {e}") from None
            models.append((f"{args.compare.name} (float)", trainer, float_model, hp, val_tokens))
        else:
            payload2, t2, _, _, hp2 = open_artifact(args.compare, args, {})
            if not hp2.is_hnet:
                raise ValueError(f"--compare {args.compare}: a plain GPT has no chunks to compare")
            m2 = t2.model_from_payload(payload2, device)
            title2 = f"{args.compare.name} ({'sp%d' % hp2.vocab_size if hp2.uses_sentencepiece else 'byte260'})"
            models.append((title2, t2, m2, hp2, t2.load_validation(hp2).tokens))
    reports, views = [], []
    for i, (name, t, m, h, tokens) in enumerate(models):
        compare = float_model if i == 0 else None
        reports.append(boundaries.analyse(t, m, h, tokens, device, args.boundary_tokens, compare_model=compare))
        views.append(boundaries.view_of(name, h, boundaries.collect(m, h, tokens, device, h.train_seq_len)))
    results["boundaries"] = reports[0]
    if len(reports) > 1:
        results["compare_boundaries"] = reports[1]
    if args.html:
        boundaries.write_html(args.html, views, reports)
        results["html"] = str(args.html)


def size_line(s: dict) -> str:
    verdict = "OK" if s["headroom"] >= 0 else "OVER THE CAP"
    return (f"size: code {s['code_bytes']:,} + model {s['model_bytes']:,} = {s['total_bytes']:,} bytes "
            f"(cap {s['cap_bytes']:,}, headroom {s['headroom']:,}): {verdict}")


def print_results(r: dict) -> None:
    if "sample" in r:
        import generate

        generate.print_report(r["sample"])
        return
    for w in r.get("data_warnings", []):
        print(f"WARNING: {w}")
    for m in r["data_mismatches"]:
        print(f"WARNING: scored with data other than the artifact's: {m}")
    print(f"{'evaluation':<24}{'val_loss':>12}{'val_bpb':>12}{'tokens':>14}{'bytes':>14}")
    for key in ("roundtrip", "sliding", "dynamic_cap"):
        if key in r:
            e = r[key]
            label = f"sliding (stride {e['stride']})" if key == "sliding" else key.replace("_", " ")
            print(f"{label:<24}{e['val_loss']:>12.6f}{e['val_bpb']:>12.6f}{e['tokens']:>14,}{e['bytes']:>14,}")
    print(size_line(r["size"]))
    for key in ("boundaries", "compare_boundaries"):
        if key in r:
            print(("" if key == "boundaries" else "compared model's ") + boundary_summary(r[key]))
    if "html" in r:
        print(f"html: {r['html']}")


def boundary_summary(b: dict) -> str:
    lines = [f"boundaries: {b['tokens_per_chunk']:.2f} tokens ({b['bytes_per_chunk']:.2f} bytes) per chunk, "
             f"{b['boundaries_per_256_bytes']:.1f} per 256 bytes",
             f"  word starts: precision {b['precision']:.3f} recall {b['recall']:.3f}; on the space: precision "
             f"{b['precision_on_space']:.3f} recall {b['recall_on_space']:.3f}; precision one token before / after "
             f"{b['precision_shift_minus1']:.3f} / {b['precision_shift_plus1']:.3f}",
             f"  chunk length {b['chunk_bytes_mean']:.2f} bytes, CV {b['chunk_bytes_cv']:.2f}"
             + (f" ({b['chunk_tokens_mean']:.2f} tokens, CV {b['chunk_tokens_cv']:.2f})" if "chunk_tokens_mean" in b else ""),
             f"  surprise (nats) of tokens cut before {b['surprise_at_boundaries']:.3f}, elsewhere {b['surprise_elsewhere']:.3f}",
             "  boundary flips with the window shifted by " + ", ".join(
                 f"{s}: {v:.3f}" for s, v in b["shift_flip_rate"].items())]
    if "fixed_cap" in b:
        c = b["fixed_cap"]
        lines.append(f"  fixed cap {c['cap']}: {c['rows_truncated']} of {c['rows']} windows truncated, "
                     f"{c['boundaries_dropped']} boundaries dropped")
    if "flip_rate_vs_compare" in b:
        lines.append(f"  boundary flips vs the float model: {b['flip_rate_vs_compare']:.4f}")
    lines.append(f"  chunks: {b['example']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch.distributed as dist

    args = parse_args(argv)
    try:
        results, code = evaluate(args)
        if dist.is_initialized():  # under torchrun: leave together, or gloo's teardown can abort a rank
            dist.barrier()
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, OSError) as e:  # the trainers' ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print_results(results)
        if args.json:
            files.write_atomic(args.json, json.dumps(results, indent=2) + "\n")
        if code == 4:
            print(f"error: {args.artifact} makes the submission {results['size']['total_bytes']:,} bytes, "
                  f"over the {results['size']['cap_bytes']:,}-byte cap", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
