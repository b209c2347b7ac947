"""Which compression makes our int6 artifacts smallest, measured on the artifacts themselves.

    python bench/codecs.py runs/minigolf_*/study03_*_seed1337/final_model.int6.ptz --out bench/logs/codecs/cpu.md

Each artifact is read back (its digest checked by the trainer that made it) and its payload
compressed again every way below; the table gives bytes (code excluded) and the change against
the published codec:
- torch.save + zstd-22: the published studies' int6 format (study 03's EXPORT_CODEC=torch_zstd);
- torch.save + lzma (preset 9, extreme): the standard library's strongest;
- grouped: each kind of tensor (int6 codes, int8 tables, fp16 scales, small fp16/fp32 tensors) one
  raw stream, compressed by zstd-22 or lzma, with or without byte shuffling (byte b of every
  element together), plus the JSON header that names each tensor's place;
- grouped, per stream the smaller of zstd-22 and lzma, shuffled: what study 03's
  EXPORT_CODEC=grouped writes. Its row is the trainer's own compress() output, which the bench
  reads back to the artifact's digest; the header line is that output less the per-stream best.
  The bench groups the streams itself, as the trainer does (the trainer is self-contained).
Nothing here needs a dependency beyond the trainer's own (zstandard, the standard library's lzma).
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
from pathlib import Path

import torch
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import files, modules  # noqa: E402

CODECS = {"zstd-22": lambda raw: zstandard.ZstdCompressor(level=22, write_checksum=True).compress(raw),
          "lzma": lambda raw: lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)}


def streams(payload: dict) -> dict[str, tuple[int, bytes]]:
    """kind -> (element width, raw bytes), the grouping study 03's grouped codec uses."""
    out: dict[str, tuple[int, list]] = {}
    for name in sorted(payload["tensors"]):
        for key, v in sorted(payload["tensors"][name].items()):
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            kind = f"{key}:{t.dtype}" if key != "q" else f"q{payload['tensors'][name].get('bits')}:{t.dtype}"
            out.setdefault(kind, (t.element_size(), []))[1].append(t.contiguous().reshape(-1).view(torch.uint8)
                                                                  .numpy().tobytes())
    return {k: (w, b"".join(parts)) for k, (w, parts) in out.items()}


def measure(artifact: Path) -> dict:
    """Bytes of one artifact's payload under every codec of the table, and the trainer's grouped output."""
    payload = files.read_payload(artifact)
    trainer = modules.trainer_of(ROOT / "studies" / payload["trainer"]["study_file"].split("/")[0])
    payload = files.checked_payload(trainer, payload, artifact)
    buf = io.BytesIO()
    torch.save(payload, buf)
    sizes = {f"torch.save + {name}": len(fn(buf.getvalue())) for name, fn in CODECS.items()}
    study03 = modules.trainer_of(modules.study_dir("03"))  # the grouped codec's trainer, whoever made the artifact
    groups = streams(payload)
    per_stream = {(name, shuffle): {k: len(fn(study03.byte_shuffle(raw, w) if shuffle else raw))
                                    for k, (w, raw) in groups.items()}
                  for name, fn in CODECS.items() for shuffle in (False, True)}
    for (name, shuffle), by_kind in per_stream.items():
        sizes[f"grouped, {name}{', shuffled' if shuffle else ''} (streams only)"] = sum(by_kind.values())
    best = {k: min(per_stream[(n, True)][k] for n in CODECS) for k in groups}
    sizes["grouped, best of the two a stream, shuffled (streams only)"] = sum(best.values())
    written = study03.compress({**payload, "config": {**payload["config"], "export_codec": "grouped"}}, "int6")
    sizes["study 03 EXPORT_CODEC=grouped (written, with its header)"] = len(written)
    back = study03.decompress_grouped(written)
    if study03.tensors_digest(back["tensors"]) != payload["digest"]:
        raise ValueError(f"{artifact}: the grouped codec did not read back to the artifact's digest")
    return {"artifact": str(artifact), "sizes": sizes, "header_bytes": len(written) - sum(best.values()),
            "streams": {k: {"raw": len(raw), **{f"{n}{' shuffled' if s else ''}": per_stream[(n, s)][k]
                                                 for n in CODECS for s in (False, True)}}
                        for k, (_, raw) in groups.items()}}


def report(results: list[dict], argv: list[str]) -> str:
    names = list(results[0]["sizes"])
    base = "torch.save + zstd-22"
    runs = [Path(r["artifact"]).parent.name or r["artifact"] for r in results]
    if len(set(runs)) < len(runs):  # the same run name in two benches: name its folder too
        runs = ["/".join(Path(r["artifact"]).parts[-3:-1]) for r in results]
    head = ["codec", *runs, "mean change"]
    rows = []
    for n in names:
        change = sum(r["sizes"][n] / r["sizes"][base] - 1 for r in results) / len(results)
        rows.append([n, *(f"{r['sizes'][n]:,}" for r in results), f"{change:+.1%}"])
    kinds = results[0]["streams"]
    stream_rows = [[k, f"{v['raw']:,}", *(f"{v[c]:,}" for c in list(v)[1:])] for k, v in kinds.items()]
    return "\n".join([f"`python bench/codecs.py {' '.join(argv)}`: model bytes of each artifact's payload "
                      "(code excluded) by codec", "", files.markdown_table(head, rows), "",
                      f"Streams of {runs[0]}: raw bytes and each codec's", "",
                      files.markdown_table(["stream", "raw", *list(kinds[next(iter(kinds))])[1:]], stream_rows),
                      "", "grouped header (zstd-compressed JSON + sha256 + framing): "
                      f"{results[0]['header_bytes']:,} bytes"]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path, help="int6 artifacts (final_model.int6.ptz) of study 02 or 03")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    try:
        results = [measure(a) for a in args.artifacts]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files.report(report(results, sys.argv[1:] if argv is None else argv), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
