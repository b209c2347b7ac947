"""Shared test helpers: the repository root, trainer loading by file path, offline hub."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network


def load_module(relpath: str, name: str | None = None):
    """Import a repository file by path (trainers and data scripts are not a package)."""
    path = ROOT / relpath
    name = name or "m_" + path.stem.replace("-", "_") + "_" + str(abs(hash(str(path))))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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
