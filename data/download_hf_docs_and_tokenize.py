"""Documents -> tokenizers -> challenge-format shards, plus a manifest.json describing them.

Documents come from the Hugging Face dataset repo (default willdepueoai/parameter-golf,
subfolder datasets: docs_selected.jsonl and its sidecar docs_selected.source_manifest.json) or
from a local file given with --docs: jsonl with a "text" field, or plain text with documents
separated by blank lines, optionally .gz/.xz/.zst compressed. The first --num-val-docs documents
are the validation split (default: the sidecar's docs_val, else 50,000), the rest train.

  python data/download_hf_docs_and_tokenize.py --output-root data \\
      --tokenizer-config data/tokenizer_specs_sp1024.json                  # from the hub
  python data/download_hf_docs_and_tokenize.py --docs data/sample/sotu_1961_2021.jsonl.xz \\
      --output-root data/sample_export --tokenizer-config data/tokenizer_specs_byte260.json

Writes DIR/datasets/fineweb10B_<suffix>/fineweb_{val,train}_NNNNNN.bin, DIR/tokenizers/ and
DIR/manifest.json (SPEC 3). Every file is written under a temporary name and renamed when
complete, so an interrupted export never leaves a shard that looks whole. Unlike the published
exporter, SentencePiece is trained on training documents only unless
--tokenizer-train-includes-val is given.
"""
import argparse
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
DEFAULT_SHARD_SIZE = 100_000_000
DEFAULT_NUM_VAL_DOCS = 50_000
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BYTE_OFFSET = 4  # byte260: byte b is id b + 4, after the four special ids
MAX_VOCAB = 1 << 16  # shard bodies are uint16
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_SUBFOLDER = "datasets"
HUB_DOCS_NAME = "docs_selected.jsonl"
HUB_SIDECAR_NAME = "docs_selected.source_manifest.json"
# SentencePiece silently drops input lines longer than max_sentence_length (4192 bytes by
# default); we cut long lines at spaces below it instead of losing whole documents.
SP_MAX_SENTENCE_BYTES = 4192
SP_SEED = 1337
# Tried in turn when the corpus has more distinct characters than the vocab can hold at
# 0.999; SentencePiece refuses coverages below 0.98.
SP_COVERAGE_LADDER = (0.999, 0.995, 0.99, 0.98)
ENCODE_BATCH_DOCS = 256


class DataError(Exception):
    """Bad input or a corrupt file; the message names the file and what was expected."""


class ShardFormatError(DataError):
    pass


class HubUnavailableError(DataError):
    pass


# ---------------------------------------------------------------------------- shards

@contextlib.contextmanager
def atomic_write(path: Path):
    """Open a temp file beside `path` for binary writing; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    """The digest the manifest records for a tokenizer file, so that a trainer can refuse another
    tokenizer of the same vocabulary size (its byte counts, and so the BPB, would be wrong)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_file(entry: dict) -> str | None:
    """The file of a manifest tokenizer entry that a trainer's TOKENIZER_PATH names."""
    return entry.get("model_path") or entry.get("path")


def write_shard(path, ids) -> None:
    """Write ids as a challenge shard: 256 int32 header (magic, version, count), uint16 body."""
    ids = np.asarray(ids)
    if ids.dtype != np.uint16:
        if ids.size and (ids.min() < 0 or ids.max() >= MAX_VOCAB):
            raise DataError(f"{path}: token ids must be in [0, {MAX_VOCAB})")
        ids = ids.astype(np.uint16)
    if ids.size >= 2**31:
        raise DataError(f"{path}: {ids.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, ids.size)
    with atomic_write(Path(path)) as f:
        f.write(header.tobytes())
        f.write(ids.astype("<u2", copy=False).tobytes())


def shard_token_count(path) -> int:
    """Validate a shard's header and size without reading its body; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardFormatError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if len(raw) < HEADER_BYTES:
        raise ShardFormatError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise ShardFormatError(f"{path}: magic {header[0]}, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ShardFormatError(f"{path}: version {header[1]}, expected {SHARD_VERSION}")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise ShardFormatError(f"{path}: {size} bytes, expected {HEADER_BYTES + 2 * count} "
                               f"for the {count} tokens its header declares")
    return count


def read_shard(path) -> np.ndarray:
    """Return a shard's token ids (uint16) after checking its header and length."""
    count = shard_token_count(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)


class ShardWriter:
    """Streams documents of one split into fixed-size shards named fineweb_<split>_NNNNNN.bin."""

    def __init__(self, directory: Path, split: str, shard_size: int):
        self.directory, self.split = directory, split
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.fill = self.files = self.tokens = self.docs = 0

    def add_document(self, ids: np.ndarray) -> None:
        self.docs += 1
        for chunk in (np.array([BOS_ID], dtype=np.uint16), ids):
            pos = 0
            while pos < len(chunk):  # a document may straddle two shards, as in the challenge
                take = min(len(self.buffer) - self.fill, len(chunk) - pos)
                self.buffer[self.fill:self.fill + take] = chunk[pos:pos + take]
                self.fill, pos = self.fill + take, pos + take
                if self.fill == len(self.buffer):
                    self.flush()

    def flush(self) -> None:
        if self.fill:
            write_shard(self.directory / f"fineweb_{self.split}_{self.files:06d}.bin",
                        self.buffer[:self.fill])
            self.files, self.tokens, self.fill = self.files + 1, self.tokens + self.fill, 0


# ---------------------------------------------------------------------------- documents

class _ZstdFile(io.RawIOBase):
    """Reads a .zst file (one or more frames). The zstandard package's own readers end
    silently on a truncated file; this raises EOFError instead."""

    def __init__(self, path):
        self.chunks, self.pending = self._decompress(path), b""

    @staticmethod
    def _decompress(path) -> Iterator[bytes]:
        import zstandard

        frame, complete = zstandard.ZstdDecompressor().decompressobj(), True
        with open(path, "rb") as f:
            while data := f.read(1 << 20):
                while data:
                    yield frame.decompress(data)
                    complete, data = frame.eof, frame.unused_data if frame.eof else b""
                    if frame.eof:
                        frame = zstandard.ZstdDecompressor().decompressobj()
        if not complete:
            raise EOFError("the zstd stream ends in the middle of a frame (truncated file?)")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            self.pending = next(self.chunks, None)
            if self.pending is None:
                self.pending = b""
                return 0
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def close(self) -> None:
        self.chunks.close()
        super().close()


def _open_zstd(path, mode):
    return io.BufferedReader(_ZstdFile(path))


OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".zst": _open_zstd, ".zstd": _open_zstd}  # binary readers


class DocumentFile:
    """A local docs file, re-read on every iteration (so a corpus never has to fit in memory)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: docs file not found")
        name = self.path.name
        self.compression = next((s for s in OPENERS if name.endswith(s)), None)
        base = name[: -len(self.compression)] if self.compression else name
        self.jsonl = base.endswith((".jsonl", ".json"))
        self.stem = base.rsplit(".", 1)[0] if "." in base else base

    def sidecar(self) -> tuple[Path | None, dict | None]:
        """The `<stem>.meta.json` (or published `<stem>.source_manifest.json`) beside the file."""
        for suffix in (".meta.json", ".source_manifest.json"):
            candidate = self.path.with_name(self.stem + suffix)
            if candidate.is_file():
                return candidate, load_json_object(candidate)
        return None, None

    def __iter__(self) -> Iterator[str]:
        opener = OPENERS.get(self.compression, open)
        read_errors = (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError, ValueError)
        if opener is _open_zstd:
            import zstandard
            read_errors += (zstandard.ZstdError,)  # corrupt data (not a subclass of the above)
        position = {"line": 0, "offset": 0}
        try:
            with opener(self.path, "rb") as f:
                lines = self._decoded_lines(f, position)
                if self.jsonl:
                    for line in lines:
                        if line.strip():
                            yield self._text_field(json.loads(line), position["line"])
                else:
                    yield from self._blank_line_blocks(lines)
        except read_errors as e:
            where = f" line {position['line']} (byte offset {position['offset']})" if position["line"] else ""
            raise DataError(f"{self.path}{where}: cannot read documents ({e})") from e

    @staticmethod
    def _decoded_lines(f, position: dict) -> Iterator[str]:
        """Lines decoded one at a time, so a UTF-8 error names its own line and byte offset
        (a text-mode reader decodes ahead and blames an earlier line)."""
        for raw in f:
            position["line"] += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                position["offset"] += e.start
                raise
            yield text[:-2] + "\n" if text.endswith("\r\n") else text  # as text mode would
            position["offset"] += len(raw)

    def _text_field(self, record, line_no: int) -> str:
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{self.path} line {line_no}: expected a JSON object with a "
                            f"string 'text' field")
        return record["text"]

    @staticmethod
    def _blank_line_blocks(f) -> Iterator[str]:
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


def load_json_object(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


# ---------------------------------------------------------------------------- tokenizers

@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    kind: str  # "byte" or "sentencepiece_bpe"
    vocab_size: int
    dataset_suffix: str

    @property
    def dataset_name(self) -> str:
        return f"fineweb10B_{self.dataset_suffix}"

    @property
    def files(self) -> dict[str, str]:
        """Tokenizer files relative to the output root, keyed as in the manifest."""
        if self.kind == "byte":
            return {"path": f"tokenizers/fineweb_pure_byte_{self.vocab_size}.json"}
        stem = f"tokenizers/fineweb_{self.vocab_size}_bpe"
        return {"model_path": stem + ".model", "vocab_path": stem + ".vocab"}


def load_tokenizer_specs(path) -> list[TokenizerSpec]:
    """Parse and check a spec json: {"tokenizers": [{name, kind, vocab_size, dataset_suffix}]}."""
    entries = load_json_object(Path(path)).get("tokenizers")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty 'tokenizers' list")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{path}: tokenizers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{where}: expected an object with a string 'name'")
        kind = entry.get("kind", "byte" if entry.get("dataset_suffix") == "byte260" else None)
        vocab = entry.get("vocab_size", 260 if kind == "byte" else None)
        if kind not in ("byte", "sentencepiece_bpe"):
            raise DataError(f"{where}: unknown kind {kind!r}, expected 'byte' or 'sentencepiece_bpe'")
        if not isinstance(vocab, int) or isinstance(vocab, bool):
            raise DataError(f"{where}: vocab_size must be an integer")
        if kind == "byte" and vocab != 256 + BYTE_OFFSET:
            raise DataError(f"{where}: a byte tokenizer has vocab_size 260, got {vocab}")
        if vocab > MAX_VOCAB:
            raise DataError(f"{where}: vocab_size {vocab} does not fit uint16 shard ids "
                            f"(at most {MAX_VOCAB})")
        if kind == "sentencepiece_bpe" and vocab <= 256 + BYTE_OFFSET:
            raise DataError(f"{where}: vocab_size {vocab} leaves no room beyond the 256 byte "
                            f"pieces and 4 special ids (needs > 260)")
        suffix = entry.get("dataset_suffix") or ("byte260" if kind == "byte" else f"sp{vocab}")
        specs.append(TokenizerSpec(entry["name"], kind, vocab, suffix))
    for label, key in (("name", lambda s: s.name), ("dataset_suffix", lambda s: s.dataset_suffix),
                       ("tokenizer file", lambda s: tuple(s.files.values()))):
        values = [key(s) for s in specs]
        duplicates = sorted({str(v) for v in values if values.count(v) > 1})
        if duplicates:
            raise DataError(f"{path}: duplicate {label} {', '.join(duplicates)}")
    return specs


def encode_byte260(text: str) -> np.ndarray:
    """byte260 ids of a text (no BOS): UTF-8 byte b becomes id b + 4."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16) + BYTE_OFFSET


def split_for_sentencepiece(text: str, max_bytes: int = SP_MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Lines of a document, each under max_bytes UTF-8 bytes: long lines are cut at a space
    (the space starts the next piece), or at a character boundary if a line has no space."""
    for line in text.split("\n"):
        data = line.encode("utf-8")
        start = 0
        while len(data) - start > max_bytes:
            end = start + max_bytes
            while data[end] & 0xC0 == 0x80:  # never cut inside a UTF-8 sequence
                end -= 1
            space = data.rfind(b" ", start + 1, end)
            end = space if space > start else end
            yield data[start:end].decode("utf-8")
            start = end
        if start < len(data):
            yield data[start:].decode("utf-8")


def tokenizer_training_lines(docs: Iterable[str], num_val_docs: int, include_val: bool = False,
                             max_docs: int | None = None) -> Iterator[str]:
    """The text SentencePiece trains on: training documents only unless include_val (the
    published exporter read from the first document, i.e. the validation split)."""
    used = 0
    for index, text in enumerate(docs):
        if index < num_val_docs and not include_val:
            continue
        if max_docs is not None and used >= max_docs:
            return
        used += 1
        yield from (line for line in split_for_sentencepiece(text) if line.strip())


def train_sentencepiece(lines: Iterable[str], spec: TokenizerSpec, output_root: Path) -> dict:
    """Train the BPE model of SPEC 3.2 and write its .model and .vocab files atomically.

    The text is staged in a temp file (a retry at lower coverage reads it again) and streamed
    to the trainer, whose model goes to memory: no temp path ends up inside the model, so the
    same text gives the same model bytes wherever it is exported."""
    import io

    import sentencepiece as spm

    files = {key: output_root / rel for key, rel in spec.files.items()}
    files["model_path"].parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=files["model_path"].parent, prefix=".sp-train-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        num_lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
                num_lines += 1
        if num_lines == 0:
            raise DataError(f"no training text for {spec.name}: the training split is empty")
        for coverage in SP_COVERAGE_LADDER:
            model = io.BytesIO()
            spm.set_random_generator_seed(SP_SEED)
            try:
                with open(corpus, encoding="utf-8") as f:
                    spm.SentencePieceTrainer.train(
                        sentence_iterator=(line.rstrip("\n") for line in f), model_writer=model,
                        model_type="bpe", vocab_size=spec.vocab_size,
                        character_coverage=coverage, byte_fallback=True, split_digits=True,
                        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
                        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
                        max_sentence_length=SP_MAX_SENTENCE_BYTES,
                        num_threads=1, minloglevel=2)  # one thread: identical models run to run
                break
            except RuntimeError as e:
                if "required_chars" not in str(e) or coverage == SP_COVERAGE_LADDER[-1]:
                    raise DataError(f"SentencePiece training for {spec.name} (vocab_size "
                                    f"{spec.vocab_size}, character_coverage {coverage}) "
                                    f"failed: {e}") from e
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # The .vocab file SentencePiece itself writes: piece, tab, score (C++ "%g" formatting).
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                    for i in range(processor.vocab_size()))
    with atomic_write(files["model_path"]) as f:
        f.write(model.getvalue())
    with atomic_write(files["vocab_path"]) as f:
        f.write(vocab.encode("utf-8"))
    return {"lines": num_lines, "character_coverage": coverage}


def write_byte_tokenizer(spec: TokenizerSpec, output_root: Path) -> None:
    description = {"name": spec.name, "kind": "byte", "vocab_size": spec.vocab_size,
                   "pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
                   "byte_offset": BYTE_OFFSET,
                   "scheme": "text is UTF-8 encoded; byte b is id b + 4"}
    with atomic_write(output_root / spec.files["path"]) as f:
        f.write((json.dumps(description, indent=2) + "\n").encode("utf-8"))


def _sentencepiece_encoder(model_path: Path, spec: TokenizerSpec):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    if processor.vocab_size() != spec.vocab_size:
        raise DataError(f"{model_path}: vocab size {processor.vocab_size()}, "
                        f"expected {spec.vocab_size}")
    return lambda texts: [np.asarray(ids, dtype=np.uint16)
                          for ids in processor.encode(texts, out_type=int)]


# ---------------------------------------------------------------------------- export

@dataclass
class ExportPlan:
    """What one export reads and writes, resolved once from the arguments of export()."""
    docs: Iterable[str]  # re-iterable: read for counting, tokenizer training and export
    label: str  # names the documents in messages
    output_root: Path
    num_docs: int
    num_val_docs: int
    shard_size: int
    tokenizer_train_includes_val: bool
    tokenizer_train_docs: int | None
    progress: bool


def export(docs, output_root, tokenizer_specs, num_val_docs: int | None = None, *,
           shard_size: int = DEFAULT_SHARD_SIZE, tokenizer_train_includes_val: bool = False,
           tokenizer_train_docs: int | None = None, num_docs: int | None = None,
           source: dict | None = None, progress: bool = True) -> dict:
    """Tokenize docs with every spec, write shards, tokenizer files and manifest.json under
    output_root; return the manifest.

    docs: a docs file path, a DocumentFile, or a list of strings. tokenizer_specs: a spec json
    path or a list of TokenizerSpec. num_val_docs / num_docs: None means the docs file's
    sidecar (docs_val, num_docs), else 50,000 / a counting pass.
    """
    if isinstance(docs, (str, Path)):
        docs = DocumentFile(docs)
    if isinstance(tokenizer_specs, (str, Path)):
        tokenizer_specs = load_tokenizer_specs(tokenizer_specs)
    sidecar_path, sidecar = docs.sidecar() if isinstance(docs, DocumentFile) else (None, None)
    label = str(docs.path) if isinstance(docs, DocumentFile) else "the documents"
    source = {"docs": label if isinstance(docs, DocumentFile) else "in-memory list",
              **(source or {}), "sidecar": str(sidecar_path) if sidecar_path else None}
    sidecar = sidecar or {}
    if num_val_docs is None:
        num_val_docs = int(sidecar.get("docs_val", DEFAULT_NUM_VAL_DOCS))
    if num_val_docs < 1 or shard_size <= 0:
        raise DataError(f"--num-val-docs must be at least 1 (the validation split cannot be empty) "
                        f"and --shard-size positive, got {num_val_docs} and {shard_size}")
    if num_docs is None:
        num_docs = int(sidecar.get("num_docs") or sum(1 for _ in docs))
    if num_docs == 0:
        raise DataError(f"{label}: no documents found (expected jsonl lines with a 'text' "
                        f"field, or plain text with blank lines between documents)")
    if num_docs <= num_val_docs:
        raise DataError(f"{label}: {num_docs} documents, but the first {num_val_docs} are "
                        f"validation (--num-val-docs) and at least one training document is "
                        f"needed")
    if Path(output_root).exists() and not Path(output_root).is_dir():
        raise DataError(f"--output-root {output_root}: exists and is not a directory")
    plan = ExportPlan(docs, label, Path(output_root), num_docs, num_val_docs, shard_size,
                      tokenizer_train_includes_val, tokenizer_train_docs, progress)

    _forget_datasets(plan.output_root / "manifest.json", {s.dataset_name for s in tokenizer_specs})
    encoders, tokenizer_entries = build_tokenizers(plan, tokenizer_specs)
    datasets = write_datasets(plan, tokenizer_specs, encoders)
    manifest = {"num_docs": num_docs, "num_val_docs": num_val_docs, "shard_size": shard_size,
                "bos_id": BOS_ID, "append_eos": False, "source": source,
                "tokenizers": tokenizer_entries, "datasets": datasets}
    manifest = _merge_with_existing(plan.output_root / "manifest.json", manifest)
    with atomic_write(plan.output_root / "manifest.json") as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def build_tokenizers(plan: ExportPlan, specs: list[TokenizerSpec]) -> tuple[dict, list[dict]]:
    """Write each tokenizer's files (training SentencePiece); return the encoders (texts ->
    list of id arrays, no BOS) by name and the manifest's tokenizer entries."""
    encoders, entries = {}, []
    for spec in specs:
        entry = {"name": spec.name, "kind": spec.kind, "vocab_size": spec.vocab_size,
                 "pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
                 **spec.files}
        if spec.kind == "byte":
            write_byte_tokenizer(spec, plan.output_root)
            encoders[spec.name] = lambda texts: [encode_byte260(t) for t in texts]
        else:
            include_val = plan.tokenizer_train_includes_val
            available = plan.num_docs - (0 if include_val else plan.num_val_docs)
            train_docs = min(available, plan.tokenizer_train_docs or available)
            print(f"training SentencePiece BPE {spec.vocab_size} on {train_docs} documents "
                  f"({'validation included' if include_val else 'training split only'})",
                  file=sys.stderr, flush=True)
            lines = tokenizer_training_lines(plan.docs, plan.num_val_docs, include_val,
                                             plan.tokenizer_train_docs)
            entry["training"] = {"docs": train_docs, "includes_val": include_val,
                                 "seed": SP_SEED, "max_sentence_bytes": SP_MAX_SENTENCE_BYTES,
                                 **train_sentencepiece(lines, spec, plan.output_root)}
            encoders[spec.name] = _sentencepiece_encoder(
                plan.output_root / spec.files["model_path"], spec)
        entry["sha256"] = file_sha256(plan.output_root / tokenizer_file(entry))
        entries.append(entry)
    return encoders, entries


def write_datasets(plan: ExportPlan, specs: list[TokenizerSpec], encoders: dict) -> list[dict]:
    """One pass over the documents, encoding each batch with every tokenizer into its
    dataset's val or train shards; return the manifest's dataset entries."""
    from tqdm import tqdm

    # Shards go to a staging folder renamed into place only when the export succeeded, so an
    # interrupted export never leaves a partial dataset where a trainer would read it.
    writers, staging = {}, {}
    for spec in specs:
        staging[spec.name] = plan.output_root / "datasets" / f".{spec.dataset_name}.partial"
        shutil.rmtree(staging[spec.name], ignore_errors=True)
        staging[spec.name].mkdir(parents=True)
        writers[spec.name] = {split: ShardWriter(staging[spec.name], split, plan.shard_size)
                              for split in ("val", "train")}
    text_bytes, seen = {"val": 0, "train": 0}, 0
    with tqdm(plan.docs, total=plan.num_docs, unit="doc", desc="export", mininterval=1.0,
              disable=not plan.progress) as bar:
        for batch in _batches(bar, ENCODE_BATCH_DOCS):
            splits = ["val" if seen + i < plan.num_val_docs else "train" for i in range(len(batch))]
            for text, split in zip(batch, splits):
                text_bytes[split] += len(text.encode("utf-8"))
            for spec in specs:
                for ids, split in zip(encoders[spec.name](batch), splits):
                    writers[spec.name][split].add_document(ids)
            seen += len(batch)
    if seen != plan.num_docs:
        raise DataError(f"{plan.label}: read {seen} documents, its sidecar says {plan.num_docs}")

    datasets = []
    for spec in specs:
        val, train = writers[spec.name]["val"], writers[spec.name]["train"]
        val.flush()
        train.flush()
        final = plan.output_root / "datasets" / spec.dataset_name
        if final.exists():  # the earlier export goes only once the new one is complete
            old = final.with_name(f".{spec.dataset_name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old)
        staging[spec.name].rename(final)
        datasets.append({
            "name": spec.dataset_name, "tokenizer_name": spec.name, "tokenizer_kind": spec.kind,
            "path": f"datasets/{spec.dataset_name}", "vocab_size": spec.vocab_size,
            "bos_id": BOS_ID,
            "stats": {"docs_train": train.docs, "docs_val": val.docs,
                      "files_train": train.files, "files_val": val.files,
                      "tokens_train": train.tokens, "tokens_val": val.tokens,
                      "bytes_train": text_bytes["train"], "bytes_val": text_bytes["val"]},
        })
    return datasets


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _forget_datasets(path: Path, names: set[str]) -> None:
    """Drop the entries of datasets about to be rewritten from an existing manifest, so that
    an interrupted export never leaves a manifest describing shards it had deleted."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old["datasets"] = [d for d in old["datasets"] if d.get("name") not in names]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return
    with atomic_write(path) as f:
        f.write((json.dumps(old, indent=2) + "\n").encode("utf-8"))


def _merge_with_existing(path: Path, manifest: dict) -> dict:
    """Keep the other tokenizers' entries of an earlier export of the same documents and
    split into the same root (the launcher exports byte260 and sp1024 in two calls)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return manifest

    def split_key(m: dict) -> tuple:
        return (Path(str((m.get("source") or {}).get("docs"))).name, m.get("num_docs"),
                m.get("num_val_docs"))

    if not isinstance(old, dict) or split_key(old) != split_key(manifest):
        return manifest
    for key in ("tokenizers", "datasets"):
        names = {entry["name"] for entry in manifest[key]}
        kept = [e for e in old.get(key, []) if isinstance(e, dict) and e.get("name") not in names]
        manifest[key] = kept + manifest[key]
    return manifest


# ---------------------------------------------------------------------------- hub

def hub_unreachable_reason(endpoint: str, timeout: float = 1.5) -> str | None:
    """None if a TCP connection to the hub (or the proxy in front of it) opens within
    timeout seconds, else why not. A thread bounds the time, DNS lookups included."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_url.hostname, proxy_url.port or 80
    outcome: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"no route to {host}:{port} ({e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:.1f} s"


def require_hub(what: str, remedy: str) -> None:
    """Fail at once, naming what was wanted and how to get it, when the hub is out of reach:
    huggingface_hub would otherwise retry for 10-20 s before giving up."""
    from huggingface_hub import constants

    env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if constants.HF_HUB_OFFLINE or env_offline:
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = hub_unreachable_reason(constants.ENDPOINT)
    if reason:
        raise HubUnavailableError(f"cannot fetch {what}: {reason}. {remedy}")


def hub_download(repo_id: str, filename: str, subfolder: str | None, optional: bool = False,
                 local_dir: Path | None = None) -> Path | None:
    """Download one file of a dataset repo into the Hugging Face cache, or under local_dir
    (at <local_dir>/<subfolder>/<filename>); return its path, or None when optional and the
    repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    remote = "/".join(p for p in (subfolder, filename) if p)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename,
                                    subfolder=subfolder or None, repo_type="dataset",
                                    local_dir=local_dir))
    except EntryNotFoundError as e:
        if optional:
            return None
        raise DataError(f"{remote} not found in the dataset repo {repo_id}") from e
    except Exception as e:  # the hub's errors differ between huggingface_hub versions
        raise DataError(f"cannot download {remote} from the dataset repo {repo_id}: "
                        f"{type(e).__name__}: {e}") from e


def fetch_hub_docs(repo_id: str, subfolder: str | None) -> DocumentFile:
    """docs_selected.jsonl (and its sidecar, next to it in the cache) from the hub."""
    remote = "/".join(p for p in (subfolder, HUB_DOCS_NAME) if p)
    require_hub(f"{remote} from the dataset repo {repo_id}",
                "Run where the Hugging Face hub is reachable with HF_HUB_OFFLINE unset, or "
                "export a local file instead: --docs PATH (jsonl with a 'text' field or blank-"
                "line separated text, e.g. --docs data/sample/sotu_1961_2021.jsonl.xz)")
    docs = hub_download(repo_id, HUB_DOCS_NAME, subfolder)
    hub_download(repo_id, HUB_SIDECAR_NAME, subfolder, optional=True)
    return DocumentFile(docs)


# ---------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", required=True, type=Path,
                        help="where datasets/, tokenizers/ and manifest.json are written")
    parser.add_argument("--tokenizer-config", required=True, type=Path,
                        help="tokenizer spec json, e.g. data/tokenizer_specs_sp1024.json")
    parser.add_argument("--docs", type=Path, help="local docs file instead of the hub")
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="hub dataset repo")
    parser.add_argument("--subfolder", default=DEFAULT_SUBFOLDER,
                        help="folder of docs_selected.jsonl in the repo ('' for the root)")
    parser.add_argument("--num-val-docs", type=int, default=None,
                        help="validation documents (default: sidecar docs_val, else 50,000)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="tokens per shard (default 100,000,000)")
    parser.add_argument("--tokenizer-train-docs", type=int, default=None,
                        help="train SentencePiece on at most this many documents")
    parser.add_argument("--tokenizer-train-includes-val", action="store_true",
                        help="let SentencePiece read the validation documents too (what the "
                             "published exporter did)")
    return parser


def run_cli(parser: argparse.ArgumentParser, argv, action) -> int:
    """Both data scripts' entry: parse argv, run action(args); a DataError prints `error: ...` and
    gives 1, a bad flag gives argparse's 2, returned (not raised) for in-process callers."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the problem
        return int(e.code or 0)
    try:
        action(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), argv, export_from_args)


def export_from_args(args) -> None:
    """The exporter's CLI: documents (hub or --docs) -> tokenizers -> shards, then a summary."""
    specs = load_tokenizer_specs(args.tokenizer_config)
    source = None
    if args.docs is not None:
        docs = DocumentFile(args.docs)
    else:
        docs = fetch_hub_docs(args.repo_id, args.subfolder)
        source = {"docs": f"hf://datasets/{args.repo_id}/"
                          + "/".join(p for p in (args.subfolder, HUB_DOCS_NAME) if p),
                  "repo_id": args.repo_id, "subfolder": args.subfolder}
    manifest = export(docs, args.output_root, specs, args.num_val_docs,
                      shard_size=args.shard_size,
                      tokenizer_train_includes_val=args.tokenizer_train_includes_val,
                      tokenizer_train_docs=args.tokenizer_train_docs, source=source)
    exported = {spec.dataset_name for spec in specs}
    for dataset in (d for d in manifest["datasets"] if d["name"] in exported):
        s = dataset["stats"]
        print(f"{dataset['name']}: val {s['docs_val']} docs {s['tokens_val']:,} tokens "
              f"{s['files_val']} files, train {s['docs_train']} docs {s['tokens_train']:,} tokens "
              f"{s['files_train']} files, val bytes/token "
              f"{s['bytes_val'] / max(1, s['tokens_val'] - s['docs_val']):.3f} (BOS excluded)")
    print(f"manifest: {args.output_root / 'manifest.json'}")


if __name__ == "__main__":
    sys.exit(main())
