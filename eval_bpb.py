"""Score a Parameter Golf artifact: BPB after the round trip, the 16,000,000-byte check, boundaries.

    python eval_bpb.py runs/<RUN_ID>/final_model.int6.ptz [--data DIR] [--tokenizer PATH]
        [--sliding/--no-sliding] [--stride N] [--dynamic-cap] [--json OUT] [--trainer PATH]
    torchrun --standalone --nproc_per_node=8 eval_bpb.py ARTIFACT ...

The artifact records the study trainer that made it (study folder, file, sha256), its whole
config, and fingerprints of its tokenizer and validation split. This script imports that
trainer from this repository's studies/ (never a path taken from the artifact; --trainer names
another file you trust) and reuses its model, loader, dequantiser and BPB code, so the number
it prints is computed exactly as the trainer's own final line. Exit codes: 0 ok, 2 bad input
(corrupt artifact, tokenizer or validation data not the artifact's), 3 trainer changed since
the artifact was made, 4 artifact over the size cap, 5 a loss that is not finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def import_file(path: str | Path):
    """Import a repository file by path: trainers and data scripts are self-contained files, not a package."""
    path = Path(path).resolve()
    name = "trainer_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_payload(artifact: Path) -> dict:
    """Decompress (zstd or zlib, told by the magic bytes; both check their content checksum) and
    unpickle tensors and plain data only: how we learn which trainer made the artifact. The
    trainer's verify_payload then checks the tensors against their stored digest."""
    import io
    import zlib

    import torch
    import zstandard

    if artifact.is_dir():
        raise ValueError(f"{artifact}: is a directory; pass the artifact file, e.g. {artifact}/final_model.int6.ptz")
    if not artifact.is_file():
        raise ValueError(f"{artifact}: no such artifact")
    blob = artifact.read_bytes()
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob) if blob[:4] == b"\x28\xb5\x2f\xfd" else zlib.decompress(blob)
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        hint = " (final_model.pt is the float state dict, not an artifact: pass a .ptz file)" if blob[:2] == b"PK" else ""
        raise ValueError(f"{artifact}: not a readable artifact (corrupt or truncated?){hint}: {e}") from None
    if not isinstance(payload, dict) or not {"trainer", "config", "tensors"} <= payload.keys():
        raise ValueError(f"{artifact}: decompressed, but it is not a trainer's artifact")
    return payload


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


# ---------------------------------------------------------------------------------------------
# Boundary statistics: where the router cuts, compared with word starts.
# ---------------------------------------------------------------------------------------------

WHITESPACE = set(b" \t\n\r\f\v")


@functools.lru_cache(maxsize=4)
def sentencepiece_pieces(model_file: str) -> tuple[str, ...]:
    """Every piece of a SentencePiece model, by id (read once per model file)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    return tuple(sp.id_to_piece(i) for i in range(sp.vocab_size()))


def word_starts(trainer, hp, tokens):
    """Per token: does it begin a word? byte260: a non-space byte after whitespace;
    SentencePiece: a piece with a leading "▁"."""
    import torch

    if hp.uses_sentencepiece:
        pieces = sentencepiece_pieces(hp.tokenizer_path)
        lead = torch.tensor([p.startswith("\u2581") and len(p) > 1 for p in pieces])
        return lead[tokens]
    space = torch.zeros(hp.vocab_size, dtype=torch.bool)
    space[[b + 4 for b in WHITESPACE]] = True
    is_byte = tokens >= 4
    prev_space = torch.cat((torch.ones_like(tokens[:1], dtype=torch.bool), space[tokens[:-1]]))
    return is_byte & ~space[tokens] & prev_space


def boundary_report(trainer, model, hp, val_tokens, device, max_tokens: int = 200_000) -> dict:
    """Boundary masks over the first max_tokens of validation, in non-overlapping windows
    (the first position of each window is a forced boundary and is left out of the counts)."""
    import torch

    seq = hp.train_seq_len
    n = min(val_tokens.numel() - 1, max_tokens) // seq * seq
    x = val_tokens[:n].view(-1, seq).to(device, torch.int64)
    masks = []
    model.eval()
    with torch.no_grad():
        for i in range(0, x.size(0), hp.eval_batch_seqs):
            out = model(x[i:i + hp.eval_batch_seqs], x[i:i + hp.eval_batch_seqs])
            masks.append(out.boundary_mask.cpu())
    mask = torch.cat(masks).flatten()
    tokens = x.cpu().flatten()
    starts = word_starts(trainer, hp, tokens)
    counted = torch.ones_like(mask)
    counted[::seq] = False
    counted &= tokens >= 4 if not hp.uses_sentencepiece else tokens > 3
    b, w = mask & counted, starts & counted
    hits = (b & w).sum().item()
    # A router can also settle one byte off word starts (a consistent shift, still word-like
    # units); precision against word starts moved by -1 and +1 tells that apart from noise.
    shifted = {s: (b & torch.roll(w, s)).sum().item() / max(b.sum().item(), 1) for s in (-1, 1)}
    positions = torch.nonzero(mask).flatten()
    lengths = torch.diff(positions).float()
    return {
        "tokens": int(counted.sum()),
        "boundaries": int(b.sum()),
        "tokens_per_chunk": counted.sum().item() / max(b.sum().item(), 1),
        "precision": hits / max(b.sum().item(), 1),
        "recall": hits / max(w.sum().item(), 1),
        "precision_shift_minus1": shifted[-1],
        "precision_shift_plus1": shifted[1],
        "chunk_len_cv": (lengths.std() / lengths.mean()).item() if lengths.numel() > 1 else float("nan"),
        "example": chunked_text(hp, tokens[:seq], mask[:seq]),
    }


def chunked_text(hp, tokens, mask, max_chars: int = 600) -> str:
    """Render tokens as [chunk][chunk]... starting at the first word start after position 0."""
    if hp.uses_sentencepiece:
        vocab = sentencepiece_pieces(hp.tokenizer_path)
        pieces = [vocab[int(t)].replace("\u2581", " ") for t in tokens]
    else:
        pieces = [bytes([int(t) - 4]) if t >= 4 else b"" for t in tokens]
    out, current = [], []
    for i, (piece, cut) in enumerate(zip(pieces, mask.tolist())):
        if cut and current:
            out.append(current)
            current = []
        current.append(piece)
    out.append(current)
    join = (lambda ps: "".join(ps)) if hp.uses_sentencepiece else (lambda ps: b"".join(ps).decode("utf-8", "replace"))
    text = "".join(f"[{join(c)}]" for c in out[1:])  # the first chunk starts mid-word at the window edge
    return text[:max_chars]


# ---------------------------------------------------------------------------------------------


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
                   help="report boundary statistics for an H-Net (default on)")
    p.add_argument("--trainer", type=Path, help="score with this trainer file instead of the study's own")
    p.add_argument("--ignore-hash", action="store_true", help="accept a trainer edited since the artifact was made")
    p.add_argument("--ignore-mismatch", action="store_true",
                   help="score with a tokenizer or validation split other than the artifact's")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    return p.parse_args(argv)


class EvalError(ValueError):
    """A refusal with its exit code (3 trainer changed, 5 not finite); plain ValueErrors exit 2."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.code = code


def evaluate(args) -> tuple[dict, int]:
    if args.json is not None and not args.json.resolve().parent.is_dir():
        raise ValueError(f"--json {args.json}: folder {args.json.resolve().parent} does not exist")
    payload = read_payload(args.artifact)
    trainer_path = find_trainer(payload["trainer"], args.trainer)
    sha = hashlib.sha256(trainer_path.read_bytes()).hexdigest()
    if sha != payload["trainer"]["sha256"] and not args.ignore_hash:
        raise EvalError(f"{trainer_path} changed since the artifact was made (sha256 {sha[:12]} != "
                        f"{payload['trainer']['sha256'][:12]}); pass --ignore-hash to score it anyway", 3)
    trainer = import_file(trainer_path)
    trainer.verify_payload(payload, args.artifact)
    config = dict(payload["config"])
    overrides = {"data_path": args.data, "tokenizer_path": args.tokenizer, "eval_stride": args.stride,
                 "val_max_tokens": args.val_max_tokens}
    config.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(trainer.Hyperparameters)}
    hp = trainer.Hyperparameters(**{k: v for k, v in config.items() if k in known})
    hp.check()
    code, model_bytes = len(trainer_path.read_bytes()), args.artifact.stat().st_size
    results = {"artifact": str(args.artifact), "trainer": str(trainer_path), "trainer_sha256": sha,
               "format": payload["format"],
               "size": {"code_bytes": code, "model_bytes": model_bytes, "total_bytes": code + model_bytes,
                        "cap_bytes": trainer.SIZE_CAP_BYTES, "headroom": trainer.SIZE_CAP_BYTES - code - model_bytes}}
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"artifact: {args.artifact} ({payload['format']}); trainer {os.path.relpath(trainer_path)} "
              f"(sha256 {sha[:12]})")
        print(size_line(results["size"]), flush=True)  # the verdict comes before the long evaluation
    rt = trainer.setup_device(hp)
    val = trainer.load_validation(hp)
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
    if hp.is_hnet and args.boundaries and rt.master:
        results["boundaries"] = boundary_report(trainer, model, hp, val.tokens, rt.device)
    return results, (4 if results["size"]["headroom"] < 0 else 0)


def size_line(s: dict) -> str:
    verdict = "OK" if s["headroom"] >= 0 else "OVER THE CAP"
    return (f"size: code {s['code_bytes']:,} + model {s['model_bytes']:,} = {s['total_bytes']:,} bytes "
            f"(cap {s['cap_bytes']:,}, headroom {s['headroom']:,}): {verdict}")


def print_results(r: dict) -> None:
    for m in r["data_mismatches"]:
        print(f"WARNING: scored with data other than the artifact's: {m}")
    print(f"{'evaluation':<24}{'val_loss':>12}{'val_bpb':>12}{'tokens':>14}{'bytes':>14}")
    for key in ("roundtrip", "sliding", "dynamic_cap"):
        if key in r:
            e = r[key]
            label = f"sliding (stride {e['stride']})" if key == "sliding" else key.replace("_", " ")
            print(f"{label:<24}{e['val_loss']:>12.6f}{e['val_bpb']:>12.6f}{e['tokens']:>14,}{e['bytes']:>14,}")
    print(size_line(r["size"]))
    if "boundaries" in r:
        b = r["boundaries"]
        print(f"boundaries: {b['tokens_per_chunk']:.2f} tokens per chunk, precision {b['precision']:.3f} and "
              f"recall {b['recall']:.3f} on word starts (precision one token before / after them "
              f"{b['precision_shift_minus1']:.3f} / {b['precision_shift_plus1']:.3f}), "
              f"chunk length CV {b['chunk_len_cv']:.2f}")
        print(f"chunks: {b['example']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results, code = evaluate(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, OSError) as e:  # the trainers' ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # under torchrun
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print_results(results)
        if args.json:
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            os.replace(tmp, args.json)
        if code == 4:
            print(f"error: {args.artifact} makes the submission {results['size']['total_bytes']:,} bytes, "
                  f"over the {results['size']['cap_bytes']:,}-byte cap", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
