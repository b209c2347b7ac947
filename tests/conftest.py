"""Shared test helpers: the repository root, trainer loading by file path, offline hub."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.modules import import_file  # noqa: E402  (how everything imports a trainer by path)

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network


def load_module(relpath: str):
    """Import a repository file by path, the way eval_bpb.py does (trainers and data scripts are
    not a package); the same path always gives the same module object."""
    return import_file(ROOT / relpath)


def study02():
    return load_module("studies/02_improved_hnet_byte260_and_sp1024/train_gpt.py")


# A study-02 H-Net small enough for a 2-core CPU: runs take a second or two.
TINY_ENV = {
    "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "NUM_LAYERS": "4", "OUTER_LAYERS": "1",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "ITERATIONS": "6", "WARMDOWN_ITERS": "3",
    "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
    "VAL_MAX_TOKENS": "4096", "EVAL_BATCH_SEQS": "16", "EVAL_STRIDE": "32", "GPTQ_CALIB_BATCHES": "2",
    "KEEP_FLOAT_MAX_NUMEL": "256", "TARGET_AVG_CHUNK_LEN": "4",
}


def study01():
    return load_module("studies/01_hnet_byte260_vs_sp1024/train_gpt.py")


def study03():
    return load_module("studies/03_byte_hnet_vs_byte_gpt/train_gpt.py")


def study(name: str):
    return {"01": study01, "02": study02, "03": study03}[name]()


# Every study-03 addition on at the tiny size (narrow outer stages without an MLP, a looped main
# stage, the byte-transformer stack, per-stage LRs, the grouped codec): what holds for study 02
# must hold with them. OFFICIAL_INIT and ROUTER=space change the model's structure: tests add them.
STUDY03_ON = {"OUTER_DIM": "16", "OUTER_MLP_MULT": "0", "MAIN_LOOPS": "2", "BIGRAM_HASH": "512", "SMEAR_GATE": "1",
              "ACTIVATION": "leaky_relu2", "OUTER_LR_MULT": "2", "EXPORT_CODEC": "grouped"}


def tiny_env(t) -> dict:
    """TINY_ENV restricted to the variables this trainer has (study 01 has no sliding eval or GPTQ)."""
    known = set(t.Hyperparameters.__dataclass_fields__)
    return {k: v for k, v in TINY_ENV.items() if k.lower() in known}


def tiny_hparams(t, **overrides):
    hp, _ = t.Hyperparameters.from_env({**tiny_env(t), **overrides})
    return hp


def run_tiny(t, data_dir: Path, out_dir: Path, **overrides):
    """Train, export and evaluate a tiny model in this process; returns (run, metrics)."""
    hp = tiny_hparams(t, DATA_PATH=str(data_dir), OUTPUT_DIR=str(out_dir), RUN_ID=out_dir.name, **overrides)
    return t.run_training(hp)


def final_state(run_dir: Path) -> dict:
    """A run's float final_model.pt (the weights before export)."""
    import torch

    return torch.load(run_dir / "final_model.pt", map_location="cpu")


SAMPLE = ROOT / "data" / "sample" / "sotu_1961_2021.jsonl.xz"


def read_sample_docs() -> list[str]:
    """The embedded corpus's documents, validation (2015-2021) first."""
    import json
    import lzma

    with lzma.open(SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def export_docs(docs: Path, out: Path, spec: str = "byte260", extra: tuple = ()) -> Path:
    exporter = load_module("data/download_hf_docs_and_tokenize.py")
    code = exporter.main(["--docs", str(docs), "--output-root", str(out),
                          "--tokenizer-config", str(ROOT / "data" / f"tokenizer_specs_{spec}.json"), *extra])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def sample_byte260(tmp_path_factory) -> Path:
    """The embedded corpus exported to byte260 shards; returns the dataset folder."""
    out = export_docs(SAMPLE, tmp_path_factory.mktemp("sample"))
    return out / "datasets" / "fineweb10B_byte260"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def write_shard(path, tokens) -> Path:
    """Write a challenge-format shard with plain numpy, independently of the exporter:
    256 little-endian int32 header (magic 20240520, version 1, token count), then the
    tokens as little-endian uint16."""
    import numpy as np

    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 65536))
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = 20240520, 1, tokens.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    return path
