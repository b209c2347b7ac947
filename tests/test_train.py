"""Training runs in this process on the embedded corpus: learning, resume, priming, faults."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SAMPLE, TINY_ENV, export_docs, final_state, run_tiny, study02, tiny_hparams, write_shard


def train_losses(run_dir):
    return re.findall(r"step:(\d+)/\d+ train_loss:(\S+)", (run_dir / "train.log").read_text())


def test_a_short_run_learns(sample_byte260, tmp_path):
    t = study02()
    run, metrics = run_tiny(t, sample_byte260, tmp_path / "learn", ITERATIONS="40", WARMDOWN_ITERS="10",
                            VAL_LOSS_EVERY="1000", MATRIX_LR="0.05")
    log = (tmp_path / "learn" / "train.log").read_text()
    step0 = float(re.search(r"step:0/40 val_loss:\S+ val_bpb:(\S+)", log).group(1))
    assert step0 > 7.0  # about log2(260) bits per byte before training
    assert metrics["float"]["val_bpb"] < 0.6 * step0
    assert "model_params:" in log and log.startswith('"""Study 02')  # the source heads the log
    assert re.search(r"final_int6_zstd_roundtrip_exact val_loss:\S+ val_bpb:\S+", log)
    assert re.search(r"bytes_per_chunk:\S+", log) and re.search(r"ratio_loss:\S+", log)
    for name in ("final_model.pt", "final_model.int8.ptz", "final_model.int6.ptz", "submission.json"):
        assert (tmp_path / "learn" / name).is_file()


def test_resume_continues_exactly(sample_byte260, tmp_path):
    t = study02()
    # late QAT switches on at step 5 (LR multiplier 2/3 < 0.9), after the resume point
    run_tiny(t, sample_byte260, tmp_path / "straight", ITERATIONS="6", CHECKPOINT_EVERY="3", LATE_QAT_THRESHOLD="0.9")
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_000003.pt"
    assert checkpoint.is_file()
    run_tiny(t, sample_byte260, tmp_path / "resumed", ITERATIONS="6", RESUME_FROM=str(checkpoint),
             LATE_QAT_THRESHOLD="0.9")
    assert "late_qat: on from step 6" in (tmp_path / "resumed" / "train.log").read_text()
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == ["4", "5", "6"]
    assert resumed == straight[3:]


def test_compile_priming_steps_leave_no_trace(sample_byte260, tmp_path):
    t = study02()
    run_tiny(t, sample_byte260, tmp_path / "plain", ITERATIONS="3", EMA_DECAY="0.5")
    run_tiny(t, sample_byte260, tmp_path / "primed", ITERATIONS="3", EMA_DECAY="0.5", WARMUP_STEPS="2")
    a, b = final_state(tmp_path / "plain"), final_state(tmp_path / "primed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_weights_are_the_exponential_average_of_the_steps(sample_byte260, tmp_path):
    t = study02()
    run_tiny(t, sample_byte260, tmp_path / "ema", ITERATIONS="3", EMA_DECAY="0.5", CHECKPOINT_EVERY="1")
    torch.manual_seed(1337)
    w = [t.HNet(tiny_hparams(t)).state_dict()]
    for step in (1, 2, 3):
        path = tmp_path / "ema" / "checkpoints" / f"step_{step:06d}.pt"
        w.append(torch.load(path, map_location="cpu", weights_only=True)["model"])  # tensors and plain data only
    final = final_state(tmp_path / "ema")
    for k in final:  # e3 = w0/8 + w1/8 + w2/4 + w3/2
        expected = 0.125 * w[0][k] + 0.125 * w[1][k] + 0.25 * w[2][k] + 0.5 * w[3][k]
        assert torch.allclose(final[k], expected, atol=1e-6), k
    assert not torch.allclose(final["tok_emb.weight"], w[3]["tok_emb.weight"])


def test_resuming_follows_this_runs_ema_decay_and_says_so(sample_byte260, tmp_path):
    # a checkpoint made without EMA once turned EMA off silently for a run that asked for it
    t = study02()
    run_tiny(t, sample_byte260, tmp_path / "plain", ITERATIONS="2", CHECKPOINT_EVERY="1", GPTQ_CALIB_BATCHES="0")
    checkpoint = tmp_path / "plain" / "checkpoints" / "step_000001.pt"
    run, _ = run_tiny(t, sample_byte260, tmp_path / "on", ITERATIONS="3", EMA_DECAY="0.5", RESUME_FROM=str(checkpoint),
                      GPTQ_CALIB_BATCHES="0", CHECKPOINT_EVERY="1")
    log = (tmp_path / "on" / "train.log").read_text()
    assert "ema: the checkpoint has no EMA; EMA_DECAY=0.5 starts it from the resumed weights" in log
    assert "ema: loaded EMA weights (decay 0.5)" in log
    w1 = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    w2, w3 = (torch.load(tmp_path / "on" / "checkpoints" / f"step_00000{s}.pt", weights_only=True)["model"]
              for s in (2, 3))
    final = final_state(tmp_path / "on")
    for k in final:  # EMA from step 1's weights: e3 = w1/4 + w2/4 + w3/2
        assert torch.allclose(final[k], 0.25 * w1[k] + 0.25 * w2[k] + 0.5 * w3[k], atol=1e-6), k
    with_ema = tmp_path / "on" / "checkpoints" / "step_000002.pt"
    run, _ = run_tiny(t, sample_byte260, tmp_path / "off", ITERATIONS="3", RESUME_FROM=str(with_ema),
                      GPTQ_CALIB_BATCHES="0")
    assert run.ema is None and "ema: EMA_DECAY=0, so the checkpoint's EMA weights are dropped" in \
        (tmp_path / "off" / "train.log").read_text()


def test_a_nan_loss_stops_without_applying_the_update(sample_byte260, tmp_path, monkeypatch):
    t = study02()
    real, calls = t.ratio_loss, {"n": 0}

    def poisoned(router, n, per_seq):  # 8 micro-steps per step: the 25th call is in step 4
        calls["n"] += 1
        value = real(router, n, per_seq)
        return value * float("nan") if calls["n"] == 25 else value
    monkeypatch.setattr(t, "ratio_loss", poisoned)
    with pytest.raises(t.TrainingStopped, match="non-finite loss at step 4") as info:
        run_tiny(t, sample_byte260, tmp_path / "nan", ITERATIONS="6", CHECKPOINT_EVERY="3")
    assert info.value.exit_code == 3
    assert "step_000003.pt" in str(info.value)
    state = torch.load(tmp_path / "nan" / "checkpoints" / "step_000003.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(sample_byte260, tmp_path):
    env = {**os.environ, **TINY_ENV, "DATA_PATH": str(sample_byte260), "OUTPUT_DIR": str(tmp_path / "sig"),
           "ITERATIONS": "100000", "TRAIN_LOG_EVERY": "1"}
    trainer = ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024" / "train_gpt.py"
    proc = subprocess.Popen([sys.executable, str(trainer)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step:2/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    match = re.search(r"RESUME_FROM=(\S+)", err)
    assert match and os.path.isfile(match.group(1)), err
    state = torch.load(match.group(1), map_location="cpu", weights_only=False)
    assert state["step"] >= 2


def test_bad_data_gets_a_clear_error(sample_byte260, tmp_path):
    t = study02()
    with pytest.raises(t.ConfigError, match="DATA_PATH=.*no such directory"):
        run_tiny(t, tmp_path / "missing", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(t.ConfigError, match="no fineweb_val_"):
        run_tiny(t, tmp_path / "empty", tmp_path / "o2")
    # sp1024-style ids in a byte260 run: named shard, named variable
    wrong = tmp_path / "wrong"
    write_shard(wrong / "fineweb_val_000000.bin", torch.randint(0, 1024, (5000,)).numpy())
    write_shard(wrong / "fineweb_train_000000.bin", torch.randint(0, 1024, (5000,)).numpy())
    with pytest.raises(t.ConfigError, match=r"fineweb_val_000000.bin: holds id \d+ >= VOCAB_SIZE=260"):
        run_tiny(t, wrong, tmp_path / "o3")
    truncated = tmp_path / "trunc"
    write_shard(truncated / "fineweb_val_000000.bin", list(range(4, 200)) * 30)
    path = truncated / "fineweb_val_000000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(t.ConfigError, match="fineweb_val_000000.bin: size"):
        run_tiny(t, truncated, tmp_path / "o4")


def test_tokenizer_that_does_not_match_vocab_size(tmp_path):
    t = study02()
    hp = tiny_hparams(t, VOCAB_SIZE="1024", TOKENIZER_PATH=str(tmp_path / "nope.model"))
    with pytest.raises(t.ConfigError, match="TOKENIZER_PATH=.*nope.model: file not found"):
        t.build_byte_luts(hp, torch.device("cpu"))
    hp = tiny_hparams(t, VOCAB_SIZE="512")
    with pytest.raises(t.ConfigError, match="VOCAB_SIZE=512 but TOKENIZER_PATH=.* means byte260"):
        t.build_byte_luts(hp, torch.device("cpu"))


def test_training_refuses_a_tokenizer_other_than_the_one_the_shards_were_made_with(tmp_path):
    # Two SentencePiece models of one vocabulary size: the shards were made with the first. With the
    # second, training would run and every score count the wrong bytes (and eval_bpb would agree).
    import json

    t = study02()
    out = export_docs(SAMPLE, tmp_path / "sp", "sp1024")
    other = export_docs(SAMPLE, tmp_path / "other", "sp1024", extra=("--tokenizer-train-docs", "30"))
    model = other / "tokenizers" / "fineweb_1024_bpe.model"
    data = out / "datasets" / "fineweb10B_sp1024"
    with pytest.raises(t.ConfigError, match=r"TOKENIZER_PATH=.*other.* is not the tokenizer fineweb10B_sp1024 was made"):
        run_tiny(t, data, tmp_path / "run", VOCAB_SIZE="1024", TOKENIZER_PATH=str(model))
    assert not (tmp_path / "run").exists()  # refused before the run folder exists
    with pytest.raises(t.ConfigError, match="holds id 1023 >= VOCAB_SIZE=260"):  # and byte260 on it, before that
        run_tiny(t, data, tmp_path / "run", VOCAB_SIZE="260", TOKENIZER_PATH="")
    # an older manifest without the digest: a warning in the log, not a silent pass
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["tokenizers"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    run_tiny(t, data, tmp_path / "old", VOCAB_SIZE="1024", ITERATIONS="1", TOKENIZER_PATH=str(model),
             GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0", VAL_MAX_TOKENS="1024")
    assert "records no sha256 for fineweb10B_sp1024's tokenizer" in (tmp_path / "old" / "train.log").read_text()


def test_the_same_trainer_reads_sp1024_shards_and_tokenizer(tmp_path):
    """The sample exported with SentencePiece trains and scores through the same code."""
    t = study02()
    out = export_docs(SAMPLE, tmp_path / "sp", "sp1024")
    model = next((out / "tokenizers").glob("*.model"))
    run, metrics = run_tiny(t, out / "datasets" / "fineweb10B_sp1024", tmp_path / "run", ITERATIONS="4",
                            VOCAB_SIZE="1024", TOKENIZER_PATH=str(model), VAL_MAX_TOKENS="2048")
    assert run.model.tok_emb.weight.shape[0] == 1024
    res = metrics["int6_roundtrip"]
    assert res["tokens"] == 2048 and 2.0 < res["bytes"] / res["tokens"] < 3.5  # about 2.7 bytes per sp1024 token
    assert 0 < res["val_bpb"] < 8
