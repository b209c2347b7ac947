"""Download the published pre-tokenized FineWeb shards of one tokenizer variant.

Reads the dataset repo's manifest (default willdepueoai/parameter-golf, datasets/manifest.json),
then fetches every validation shard, the first --train-shards training shards (default 80, 8B
tokens) and the tokenizer files with huggingface_hub, into the local layout the trainers read:

  python data/cached_challenge_fineweb.py --variant sp1024 [--train-shards N]
  -> data/datasets/fineweb10B_sp1024/fineweb_{val,train}_NNNNNN.bin, data/tokenizers/,
     data/manifest.json

Remote `<subfolder>/<path>` lands at `<local-dir>/<path>`: each file is downloaded into
`<local-dir>/.hf_download/` and moved into place once complete. A shard already in place whose
header and size agree is skipped, so a rerun fetches only what is missing. The official repo
publishes sp1024 only; byte260 is built locally with download_hf_docs_and_tokenize.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TRAIN_SHARDS = 80
STAGING = ".hf_download"


def _load_exporter():
    """The sibling exporter holds the shard format and hub helpers; the data scripts are
    standalone files, not a package, so it is imported by path."""
    spec = importlib.util.spec_from_file_location(
        "download_hf_docs_and_tokenize", HERE / "download_hf_docs_and_tokenize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exporter = _load_exporter()
DataError = exporter.DataError


def remote_path(subfolder: str, relative: str) -> str:
    return "/".join(p for p in (subfolder.strip("/"), relative) if p)


def plan_files(manifest: dict, variant: str, train_shards: int, source: str) -> list[str]:
    """Paths (relative to the repo subfolder) of the val shards, the first train_shards train
    shards and the tokenizer files of `fineweb10B_<variant>`, checked against the manifest."""
    datasets = {d.get("name"): d for d in manifest.get("datasets", []) if isinstance(d, dict)}
    name = f"fineweb10B_{variant}"
    if name not in datasets:
        raise DataError(f"{source} has no dataset {name}; it has: "
                        f"{', '.join(sorted(map(str, datasets))) or 'none'}")
    dataset = datasets[name]
    stats = dataset.get("stats") or {}
    files_train, files_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards < 0 or train_shards > files_train:
        raise DataError(f"--train-shards {train_shards}: {source} has {files_train} train "
                        f"shards for {name} (choose 0..{files_train})")
    tokenizers = {t.get("name"): t for t in manifest.get("tokenizers", []) if isinstance(t, dict)}
    tokenizer = tokenizers.get(dataset.get("tokenizer_name"))
    if tokenizer is None:
        raise DataError(f"{source}: tokenizer {dataset.get('tokenizer_name')!r} of {name} is "
                        f"not listed under 'tokenizers'")
    folder = dataset.get("path") or f"datasets/{name}"
    files = [f"{folder}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    files += [f"{folder}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    for key in ("model_path", "vocab_path", "path"):
        if tokenizer.get(key):
            # An absolute path (where the exporting machine kept it) is looked up by its name.
            path = Path(tokenizer[key])
            files.append(tokenizer[key] if not path.is_absolute() else f"tokenizers/{path.name}")
    for relative in files:
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise DataError(f"{source}: path {relative!r} would land outside the local folder")
    return files


def is_complete(path: Path) -> bool:
    """A shard is complete when its header is valid and the size matches its token count;
    other files are only ever put in place whole (renamed from a temp name)."""
    if not path.is_file():
        return False
    if path.suffix != ".bin":
        return path.stat().st_size > 0
    try:
        exporter.shard_token_count(path)
        return True
    except DataError:
        return False


def fetch(args, relative: str) -> Path:
    """Download `<subfolder>/<relative>` into the staging folder <local-dir>/.hf_download.
    huggingface_hub writes there under a temp name and renames when complete; keeping its
    downloads out of the shared cache means no second copy of each 200 MB shard."""
    staging = Path(args.local_dir) / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    (staging / ".gitignore").write_text("*\n")
    folder, _, name = remote_path(args.subfolder, relative).rpartition("/")
    return exporter.hub_download(args.repo_id, name, folder or None, local_dir=staging)


def download(args) -> tuple[int, int]:
    """Fetch the manifest and the variant's files; return (downloaded, skipped) counts."""
    from tqdm import tqdm

    source = f"{args.repo_id}/{remote_path(args.subfolder, 'manifest.json')}"
    local_dir = Path(args.local_dir)
    exporter.require_hub(
        f"{source} and the {args.variant} shards",
        f"On a machine that reaches the Hugging Face hub (HF_HUB_OFFLINE unset) run this "
        f"script and copy {local_dir}/datasets/fineweb10B_{args.variant} and "
        f"{local_dir}/tokenizers here; or build shards from a local docs file: python "
        f"data/download_hf_docs_and_tokenize.py --docs FILE --output-root {local_dir} "
        f"--tokenizer-config data/tokenizer_specs_{args.variant}.json")
    # The staged manifest stays where huggingface_hub put it, so a rerun only revalidates it.
    manifest_file = fetch(args, "manifest.json")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{source}: not a readable JSON manifest ({e})") from e
    files = plan_files(manifest, args.variant, args.train_shards, source)

    downloaded = skipped = 0
    for relative in tqdm(files, unit="file", desc=f"fineweb10B_{args.variant}"):
        destination = local_dir / relative
        if is_complete(destination):
            skipped += 1
            continue
        staged = fetch(args, relative)
        if destination.suffix == ".bin":
            exporter.shard_token_count(staged)  # a corrupt remote shard stops here
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, destination)
        downloaded += 1
    # The local manifest is the remote one plus the sha256 of each tokenizer file now on disk, so a
    # trainer can check that its TOKENIZER_PATH is the tokenizer these shards were made with.
    for entry in manifest.get("tokenizers", []):
        name = exporter.tokenizer_file(entry) if isinstance(entry, dict) else None
        local = local_dir / name if name and not Path(name).is_absolute() else None
        if local is not None and local.is_file():
            entry["sha256"] = exporter.file_sha256(local)
    with exporter.atomic_write(local_dir / "manifest.json") as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return downloaded, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="sp1024",
                        help="tokenizer variant: dataset fineweb10B_<variant> (default sp1024)")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"first N training shards (default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--repo-id", default=exporter.DEFAULT_REPO_ID, help="hub dataset repo")
    parser.add_argument("--subfolder", default=exporter.DEFAULT_SUBFOLDER,
                        help="folder of manifest.json in the repo ('' for the root)")
    parser.add_argument("--local-dir", type=Path, default=HERE,
                        help="where datasets/, tokenizers/ and manifest.json go (default: data/)")
    return parser


def main(argv=None) -> int:
    return exporter.run_cli(build_parser(), argv, download_and_report)


def download_and_report(args) -> None:
    downloaded, skipped = download(args)
    print(f"fineweb10B_{args.variant}: {downloaded} files downloaded, {skipped} already "
          f"complete, in {args.local_dir}")


if __name__ == "__main__":
    sys.exit(main())
