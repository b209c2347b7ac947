"""Shard format (SPEC 3.1): the exporter's writer and reader against a plain-numpy reference."""
import numpy as np
import pytest

from conftest import load_module, write_shard

ex = load_module("data/download_hf_docs_and_tokenize.py")


def test_round_trip_header_size_and_little_endian_body(tmp_path):
    ids = np.array([0, 1, 2, 3, 259, 1023, 65535, 258], dtype=np.int64)
    path = tmp_path / "fineweb_val_000000.bin"
    ex.write_shard(path, ids)

    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(ids)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, len(ids)]
    assert not header[3:].any()
    # Read the body byte by byte: little-endian uint16 whatever the machine.
    body = [raw[1024 + 2 * i] | raw[1025 + 2 * i] << 8 for i in range(len(ids))]
    assert body == ids.tolist()
    assert ex.read_shard(path).tolist() == ids.tolist()
    assert raw == write_shard(tmp_path / "reference.bin", ids).read_bytes()


def test_reads_reference_shards_and_empty_shard(tmp_path):
    tokens = np.arange(5000) % 300
    assert ex.read_shard(write_shard(tmp_path / "a.bin", tokens)).tolist() == tokens.tolist()
    assert ex.read_shard(write_shard(tmp_path / "empty.bin", [])).size == 0


@pytest.mark.parametrize("damage, expected", [
    (lambda raw: raw[:-2], "1222 bytes, expected 1224 for the 100 tokens"),
    (lambda raw: raw + b"\0\0", "1226 bytes, expected 1224"),
    (lambda raw: raw[:501], "501 bytes, shorter than the 1024-byte header"),
    (lambda raw: (20240521).to_bytes(4, "little") + raw[4:], "magic 20240521, expected 20240520"),
    (lambda raw: raw[:4] + (2).to_bytes(4, "little") + raw[8:], "version 2, expected 1"),
], ids=["body-short", "body-long", "header-truncated", "wrong-magic", "wrong-version"])
def test_bad_shards_raise_with_the_file_name(tmp_path, damage, expected):
    path = tmp_path / "fineweb_train_000007.bin"
    path.write_bytes(damage(write_shard(tmp_path / "good.bin", np.arange(100)).read_bytes()))
    with pytest.raises(ex.ShardFormatError, match=expected) as error:
        ex.read_shard(path)
    assert str(path) in str(error.value)
    assert isinstance(error.value, ex.DataError)


def test_missing_shard_names_the_file(tmp_path):
    with pytest.raises(ex.ShardFormatError, match="fineweb_val_000003.bin"):
        ex.read_shard(tmp_path / "fineweb_val_000003.bin")


def test_ids_outside_uint16_are_refused(tmp_path):
    with pytest.raises(ex.DataError, match=r"\[0, 65536\)"):
        ex.write_shard(tmp_path / "x.bin", [1, 65536])
    assert not (tmp_path / "x.bin").exists()


def test_writer_fills_shards_and_splits_documents_across_them(tmp_path):
    writer = ex.ShardWriter(tmp_path, "train", shard_size=7)
    docs = [np.array([10, 11, 12], dtype=np.uint16), np.array([20], dtype=np.uint16),
            np.array([30, 31, 32, 33, 34, 35, 36, 37], dtype=np.uint16)]
    for doc in docs:
        writer.add_document(doc)
    writer.flush()
    files = sorted(tmp_path.glob("fineweb_train_*.bin"))
    assert [f.name for f in files] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    sizes = [ex.read_shard(f).size for f in files]
    assert sizes == [7, 7, 1]
    stream = np.concatenate([ex.read_shard(f) for f in files]).tolist()
    assert stream == [1, 10, 11, 12, 1, 20, 1, 30, 31, 32, 33, 34, 35, 36, 37]
    assert (writer.files, writer.tokens, writer.docs) == (3, 15, 3)


def test_interrupted_write_leaves_neither_shard_nor_temp_file(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    with pytest.raises(KeyboardInterrupt):
        with ex.atomic_write(path) as f:
            f.write(b"\0" * 1024)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
