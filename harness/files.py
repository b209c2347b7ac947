"""Files the tools write and read: atomically written outputs, markdown tables, artifact payloads
(before the trainer that made them is known), and train.logs as the bench/ harnesses commit them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
from pathlib import Path

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GROUPED_MAGIC = b"HNG2"  # study 03's EXPORT_CODEC=grouped: a zstd-compressed JSON header, then the streams
LOG_SEPARATOR = "=" * 100  # the trainers' line between their own source and the rest of train.log
OMITTED = "[trainer source omitted:"  # how log_without_source's one line begins
REPO = Path(__file__).resolve().parents[1]


def shown(path: Path) -> str:
    """A path as a table's command line names it: relative to the repository when inside it."""
    full = path.resolve()
    return (full.relative_to(REPO) if full.is_relative_to(REPO) else path).as_posix()


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def report(text: str, out: Path | None) -> None:
    """A bench's table: printed, and written to `out` (its folder made) when one is given."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text)


def spread(values: list[float], fmt: str) -> str:
    """'mean (min-max)' of a table cell, or the one value; a signed format ('{:+.4f}') reads
    'mean (min to max)' so that a minus sign is never taken for the dash."""
    if len(values) == 1:
        return fmt.format(values[0])
    sep = " to " if "+" in fmt else "-"
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}{sep}{fmt.format(max(values))})"


def paired(values: dict, base: dict) -> str:
    """An arm against its base, seed by seed ({seed: value} each): the spread of value - base's value
    over the seeds both have, '-' if none. Same-seed pairs share init and data order, so their luck
    cancels."""
    diffs = [v - base[seed] for seed, v in values.items() if seed in base]
    return spread(diffs, "{:+.4f}") if diffs else "-"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_payload(artifact: Path) -> dict:
    """Decompress an artifact (zstd or zlib, told by the magic bytes; both check their content
    checksum) and unpickle tensors and plain data only: how eval_bpb learns which trainer made it.
    The trainer's verify_payload then checks the tensors against their stored digest. A grouped
    artifact gives its header only (no "tensors"): the trainer's read_artifact reads the rest."""
    import zlib

    import torch
    import zstandard

    if artifact.is_dir():
        raise ValueError(f"{artifact}: is a directory; pass the artifact file, e.g. {artifact}/final_model.int6.ptz")
    if not artifact.is_file():
        raise ValueError(f"{artifact}: no such artifact")
    blob = artifact.read_bytes()
    grouped = blob[:4] == GROUPED_MAGIC  # its header names the trainer, whose read_artifact decodes the rest
    try:
        if blob[:4] == b"HNG1":
            raise ValueError("a grouped artifact of an older study-03 trainer (plain JSON header); "
                             "commit 25926f2 reads it")
        if grouped:
            head = blob[8:8 + int.from_bytes(blob[4:8], "little")]
            payload = json.loads(zstandard.ZstdDecompressor().decompress(head))
        else:
            raw = zstandard.ZstdDecompressor().decompress(blob) if blob[:4] == ZSTD_MAGIC else zlib.decompress(blob)
            payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        hint = " (final_model.pt is the float state dict, not an artifact: pass a .ptz file)" if blob[:2] == b"PK" else ""
        raise ValueError(f"{artifact}: not a readable artifact (corrupt or truncated?){hint}: {e}") from None
    needed = {"trainer", "config"} if grouped else {"trainer", "config", "tensors"}
    if not isinstance(payload, dict) or not needed <= payload.keys():
        raise ValueError(f"{artifact}: decompressed, but it is not a trainer's artifact")
    return payload


def checked_payload(trainer, payload: dict, artifact: Path) -> dict:
    """An artifact's whole payload, checked against its stored digest by the trainer that made it.
    read_payload gives a grouped artifact's header only (no "tensors"): its trainer reads the rest."""
    return trainer.verify_payload(payload, artifact) if "tensors" in payload else trainer.read_artifact(artifact)


def log_without_source(text: str) -> str:
    """A train.log with the trainer's embedded source (80 KB, the challenge's format) replaced by one
    line naming it by sha256: the bench/ harnesses commit dozens of logs of one trainer, and the
    commit that made them holds the source. Everything after the separator is kept as written."""
    head, sep, rest = text.partition("\n" + LOG_SEPARATOR + "\n")
    if not sep or head.startswith(OMITTED):  # no source, or already replaced: nothing to do
        return text
    digest = hashlib.sha256(head.encode("utf-8")).hexdigest()  # the trainer file's own sha256
    first = head.split("\n", 1)[0]
    return (f"{OMITTED} {head.count(chr(10))} lines, sha256 {digest}; it begins {first!r}]\n"
            + LOG_SEPARATOR + "\n" + rest)


def copy_log(run_dir: Path, dest: Path) -> None:
    """A run's train.log into a bench/ logs folder, without the embedded source."""
    write_atomic(dest, log_without_source((run_dir / "train.log").read_text(encoding="utf-8")))
