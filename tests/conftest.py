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
