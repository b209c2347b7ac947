"""The hub code paths of both data scripts, against a stand-in hub on 127.0.0.1, and their
fast failure when the hub is out of reach.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported (and conftest turns
offline mode on), so the scripts run in subprocesses with their own environment. The stand-in
answers the two requests hf_hub_download makes: HEAD and GET on
/datasets/<repo>/resolve/<revision>/<path>, with the X-Repo-Commit and ETag headers it needs.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import ROOT, load_module, write_shard

ex = load_module("data/download_hf_docs_and_tokenize.py")
REPO = "someone/golf-data"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub(ThreadingHTTPServer):
    """Serves `files` ({path in repo: bytes}) of one dataset repo; records every request."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files, self.requests = files, []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET"]


class HubHandler(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.answer(with_body=False)

    def do_GET(self):
        self.answer(with_body=True)

    def answer(self, with_body: bool):
        self.server.requests.append((self.command, self.path))
        prefix = f"/datasets/{REPO}/resolve/main/"
        content = self.server.files.get(self.path[len(prefix):]) if self.path.startswith(prefix) else None
        if content is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if with_body:
            self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(files):
        server = StandInHub(files)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def shard_bytes(tmp_path, tokens) -> bytes:
    return write_shard(tmp_path / "staging.bin", tokens).read_bytes()


@pytest.fixture
def published(tmp_path):
    """A small published export of sp1024: 2 val shards, 5 train shards, tokenizer files."""
    files = {}
    for split, count in (("val", 2), ("train", 5)):
        for i in range(count):
            tokens = np.arange(50 + i) % 1024
            files[f"datasets/datasets/fineweb10B_sp1024/fineweb_{split}_{i:06d}.bin"] = \
                shard_bytes(tmp_path, tokens)
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = b"model bytes"
    files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = b"<pad>\t0\n"
    files["datasets/manifest.json"] = json.dumps({
        "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
                        "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "path": "datasets/fineweb10B_sp1024", "vocab_size": 1024, "bos_id": 1,
                      "stats": {"files_train": 5, "files_val": 2, "tokens_train": 260,
                                "tokens_val": 101}}],
    }).encode()
    return files


def run_script(script, args, tmp_path, endpoint=None, offline=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "data" / script), *args], env=env,
                            capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def download(tmp_path, server, *args):
    return run_script("cached_challenge_fineweb.py",
                      ["--repo-id", REPO, "--local-dir", str(tmp_path / "data"), *args],
                      tmp_path, server.endpoint)


def test_downloads_val_a_train_prefix_and_tokenizers_then_skips_them(tmp_path, serve, published):
    server = serve(published)
    result, _ = download(tmp_path, server, "--train-shards", "3")
    assert result.returncode == 0, result.stderr
    data = tmp_path / "data"
    for relative, content in published.items():
        local = data / relative.removeprefix("datasets/")
        wanted = "train_00000" not in relative or any(f"train_00000{i}" in relative for i in range(3))
        assert local.is_file() == wanted, relative
        if wanted and relative != "datasets/manifest.json":  # the manifest gains digests (below)
            assert local.read_bytes() == content
    assert ex.read_shard(data / "datasets/fineweb10B_sp1024/fineweb_val_000001.bin").size == 51
    assert "7 files downloaded, 0 already complete" in result.stdout
    # the local manifest is the published one plus the digest of the tokenizer now on disk
    manifest = json.loads((data / "manifest.json").read_text())
    (tokenizer,) = manifest["tokenizers"]
    assert tokenizer["sha256"] == hashlib.sha256(b"model bytes").hexdigest()
    assert manifest["datasets"] == json.loads(published["datasets/manifest.json"])["datasets"]

    # Second run: everything is complete, nothing is downloaded again.
    server.requests.clear()
    result, _ = download(tmp_path, server, "--train-shards", "3")
    assert result.returncode == 0, result.stderr
    assert server.gets() == [] and "0 files downloaded, 7 already complete" in result.stdout

    # A truncated shard (an interrupted copy by some other tool) is fetched again.
    shard = data / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    server.requests.clear()
    result, _ = download(tmp_path, server, "--train-shards", "4")
    assert result.returncode == 0, result.stderr
    assert sorted(p.rsplit("/", 1)[-1] for p in server.gets() if p.endswith(".bin")) == \
        ["fineweb_train_000001.bin", "fineweb_train_000003.bin"]
    assert ex.read_shard(shard).size == 51


def test_refuses_more_train_shards_than_published(tmp_path, serve, published):
    server = serve(published)
    result, _ = download(tmp_path, server, "--train-shards", "6")
    assert result.returncode == 1
    assert "--train-shards 6" in result.stderr and "has 5 train shards" in result.stderr
    assert not [p for p in server.gets() if p.endswith(".bin")]


def test_unknown_variant_lists_the_published_ones(tmp_path, serve, published):
    result, _ = download(tmp_path, serve(published), "--variant", "sp4096")
    assert result.returncode == 1 and "no dataset fineweb10B_sp4096" in result.stderr
    assert "fineweb10B_sp1024" in result.stderr


def test_exporter_reads_docs_and_the_sidecar_split_from_the_hub(tmp_path, serve):
    docs = [f"document {i}: some text, with ünïcode." for i in range(6)]
    server = serve({
        "datasets/docs_selected.jsonl": "".join(json.dumps({"text": d}) + "\n" for d in docs).encode(),
        "datasets/docs_selected.source_manifest.json": json.dumps({"docs_val": 2, "num_docs": 6}).encode(),
    })
    out = tmp_path / "export"
    result, _ = run_script("download_hf_docs_and_tokenize.py",
                           ["--repo-id", REPO, "--output-root", str(out), "--tokenizer-config",
                            str(ROOT / "data" / "tokenizer_specs_byte260.json")],
                           tmp_path, server.endpoint)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_val_docs"] == 2 and manifest["num_docs"] == 6
    assert manifest["source"]["docs"] == f"hf://datasets/{REPO}/datasets/docs_selected.jsonl"
    val = ex.read_shard(out / "datasets/fineweb10B_byte260/fineweb_val_000000.bin")
    assert val.size == sum(len(d.encode()) + 1 for d in docs[:2])


def test_exporter_without_a_sidecar_uses_the_default_split(tmp_path, serve):
    server = serve({"datasets/docs_selected.jsonl": b'{"text": "one"}\n{"text": "two"}\n'})
    result, _ = run_script("download_hf_docs_and_tokenize.py",
                           ["--repo-id", REPO, "--output-root", str(tmp_path / "export"),
                            "--tokenizer-config", str(ROOT / "data" / "tokenizer_specs_byte260.json")],
                           tmp_path, server.endpoint)
    assert result.returncode == 1 and "the first 50000 are validation" in result.stderr


@pytest.mark.parametrize("script, args, remedy", [
    ("cached_challenge_fineweb.py", ["--local-dir", "{tmp}"], "--docs FILE"),
    ("download_hf_docs_and_tokenize.py",
     ["--output-root", "{tmp}", "--tokenizer-config", "data/tokenizer_specs_sp1024.json"],
     "--docs PATH"),
])
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no-route"])
def test_fails_fast_with_a_remedy_when_the_hub_is_out_of_reach(tmp_path, script, args, remedy, how):
    args = [a.replace("{tmp}", str(tmp_path / "out")) for a in args]
    if how == "HF_HUB_OFFLINE":
        result, seconds = run_script(script, args, tmp_path, offline=True)
        assert "HF_HUB_OFFLINE is set" in result.stderr
    else:
        import socket

        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        result, seconds = run_script(script, args, tmp_path, endpoint=f"http://127.0.0.1:{port}")
        assert f"no route to 127.0.0.1:{port}" in result.stderr
    assert result.returncode == 1 and seconds < 5
    assert result.stderr.startswith("error: cannot fetch") and remedy in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_offline_failure_in_process_is_immediate(tmp_path, capsys):
    # conftest set HF_HUB_OFFLINE=1 before anything imported huggingface_hub.
    start = time.monotonic()
    code = ex.main(["--output-root", str(tmp_path), "--tokenizer-config",
                    str(ROOT / "data" / "tokenizer_specs_byte260.json")])
    assert code == 1 and time.monotonic() - start < 2
    err = capsys.readouterr().err
    assert "docs_selected.jsonl" in err and "HF_HUB_OFFLINE" in err and "--docs" in err


def test_plan_reads_files_from_the_manifest_and_keeps_them_inside(published):
    cached = load_module("data/cached_challenge_fineweb.py")
    manifest = json.loads(published["datasets/manifest.json"])
    files = cached.plan_files(manifest, "sp1024", 1, "test manifest")
    assert files == ["datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                     "datasets/fineweb10B_sp1024/fineweb_val_000001.bin",
                     "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                     "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
    manifest["tokenizers"][0]["model_path"] = "/home/exporter/out/tokenizers/fineweb_1024_bpe.model"
    assert "tokenizers/fineweb_1024_bpe.model" in cached.plan_files(manifest, "sp1024", 0, "m")
    manifest["datasets"][0]["path"] = "../../elsewhere"
    with pytest.raises(cached.DataError, match="outside the local folder"):
        cached.plan_files(manifest, "sp1024", 0, "m")
