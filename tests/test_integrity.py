"""A score is never computed from the wrong thing: corrupt artifacts, another tokenizer or split,
a partial export, a trainer the artifact names; and the run's clock, reserve and exports."""
import json
import os
import random
import re
import signal
import time

import pytest
import torch

import eval_bpb
from conftest import SAMPLE, export_docs, load_module, run_tiny, study02, tiny_hparams


@pytest.fixture(scope="module")
def byte_run(sample_byte260, tmp_path_factory):
    t = study02()
    out = tmp_path_factory.mktemp("integrity") / "run"
    _, metrics = run_tiny(t, sample_byte260, out, ITERATIONS="4")
    return out, metrics


@pytest.fixture(scope="module")
def sp_export(tmp_path_factory):
    return export_docs(SAMPLE, tmp_path_factory.mktemp("sp") / "export", "sp1024")


@pytest.fixture(scope="module")
def sp_run(sp_export, tmp_path_factory):
    t = study02()
    model = sp_export / "tokenizers" / "fineweb_1024_bpe.model"
    out = tmp_path_factory.mktemp("sprun") / "run"
    run_tiny(t, sp_export / "datasets" / "fineweb10B_sp1024", out, ITERATIONS="2", VOCAB_SIZE="1024",
             TOKENIZER_PATH=str(model))
    return out


def score(*args):
    return eval_bpb.main([str(a) for a in args] + ["--no-sliding", "--no-boundaries"])


# --- the wall clock and the GPTQ reserve -------------------------------------------------------

def test_a_cap_within_the_reserve_is_rejected_and_no_reserve_is_taken_when_unused():
    t = study02()
    with pytest.raises(t.ConfigError, match="MAX_WALLCLOCK_SECONDS=5 leaves no training time after GPTQ_RESERVE_SECONDS=45"):
        tiny_hparams(t, MAX_WALLCLOCK_SECONDS="5")
    assert t.training_cap_ms(tiny_hparams(t, MAX_WALLCLOCK_SECONDS="60")) == 15_000  # 60 - 45
    for off in ({"GPTQ_CALIB_BATCHES": "0"}, {"EXPORT_FORMATS": "int8"}):
        hp = tiny_hparams(t, MAX_WALLCLOCK_SECONDS="5", **off)
        assert hp.reserve_seconds == 0 and t.training_cap_ms(hp) == 5000


def test_the_wall_clock_cap_stops_training_on_time(sample_byte260, tmp_path):
    # within one step, as the README says: the step before the last one ended under the cap
    t = study02()
    t0 = time.time()
    run, _ = run_tiny(t, sample_byte260, tmp_path / "cap", ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="3",
                      GPTQ_CALIB_BATCHES="0", TRAIN_LOG_EVERY="1")
    assert time.time() - t0 < 60
    log = (tmp_path / "cap" / "train.log").read_text()
    ends = [float(ms) for ms in re.findall(r"^step:\d+/100000 train_loss:.* train_time:(\d+)ms", log, re.M)]
    assert len(ends) == run.step >= 2  # how many depends on the machine's load; stopping on time does not
    # the log prints whole milliseconds: a step that ended at 2,999.6 ms (under the cap) reads 3000
    assert ends[-2] < 3000.5 and 3000 <= ends[-1] and abs(ends[-1] - run.training_time_ms) < 1
    assert f"stopping_early: wallclock_cap train_time:{run.training_time_ms:.0f}ms step:{run.step}/100000" in log


# --- exports come from the trained weights ------------------------------------------------------

def test_every_format_is_quantised_from_the_trained_float_weights(sample_byte260, tmp_path):
    t = study02()
    out = tmp_path / "float"
    run, _ = run_tiny(t, sample_byte260, out, ITERATIONS="3", GPTQ_CALIB_BATCHES="0")
    trained = torch.load(out / "final_model.pt", map_location="cpu")
    for fmt in ("int8", "int6"):
        stored = t.read_artifact(out / f"final_model.{fmt}.ptz")["tensors"]
        fresh = t.quantize_state_dict(trained, fmt, run.hp)["tensors"]
        assert stored.keys() == fresh.keys()
        for name in stored:
            for key in stored[name]:
                a, b = stored[name][key], fresh[name][key]
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (fmt, name, key)


def test_the_float_model_is_scored_once_after_training(sample_byte260, tmp_path, monkeypatch):
    t = study02()
    calls = []
    real = t.evaluate_bpb
    monkeypatch.setattr(t, "evaluate_bpb", lambda *a, **k: calls.append(k) or real(*a, **k))
    run_tiny(t, sample_byte260, tmp_path / "once", ITERATIONS="2")
    # the last step's validation, two round trips, one sliding window: no second float pass
    assert len(calls) == 4 and [k.get("stride") for k in calls] == [None, None, None, 32]


# --- corrupt artifacts and scores that are not finite ---------------------------------------------

def test_bit_flips_anywhere_in_an_artifact_are_refused(byte_run, tmp_path, capsys):
    out, _ = byte_run
    t = study02()
    for fmt in ("int6", "int8"):
        blob = (out / f"final_model.{fmt}.ptz").read_bytes()
        original = t.read_artifact(out / f"final_model.{fmt}.ptz")
        rng = random.Random(fmt)
        positions = sorted(rng.sample(range(16, len(blob)), 24)) + [len(blob) // 2]  # body, not header
        for i, pos in enumerate(positions):
            flipped = bytearray(blob)
            flipped[pos] ^= 1 << rng.randrange(8)
            path = tmp_path / f"{fmt}_{i}.ptz"
            path.write_bytes(bytes(flipped))
            try:
                same = t.tensors_digest(t.read_artifact(path)["tensors"]) == original["digest"]
            except t.ConfigError:
                same = False
            if same:  # a flip that changes nothing decoded may be scored: the weights are the original
                continue
            assert score(path) == 2, (fmt, pos)
            assert "val_bpb" not in capsys.readouterr().out


def test_a_loss_that_is_not_finite_is_an_error_never_a_score(byte_run, tmp_path, capsys):
    out, _ = byte_run
    t = study02()
    payload = t.read_artifact(out / "final_model.int6.ptz")
    payload["tensors"]["main.blocks.0.attn_scale"]["w"] = torch.full_like(
        payload["tensors"]["main.blocks.0.attn_scale"]["w"], float("nan"))
    payload["digest"] = t.tensors_digest(payload["tensors"])
    (tmp_path / "nan.ptz").write_bytes(t.compress(payload, "int6"))
    assert score(tmp_path / "nan.ptz") == 5
    captured = capsys.readouterr()
    assert "not finite" in captured.err and "roundtrip" not in captured.out


def test_directories_and_state_dicts_are_named_for_what_they_are(byte_run, tmp_path, capsys):
    out, _ = byte_run
    assert score(out) == 2
    assert "is a directory; pass the artifact file" in capsys.readouterr().err
    assert score(out / "final_model.pt") == 2
    assert "final_model.pt is the float state dict" in capsys.readouterr().err


def test_json_output_folder_is_checked_before_the_evaluation(byte_run, tmp_path, capsys, monkeypatch):
    out, _ = byte_run
    t = study02()
    monkeypatch.setattr(t, "evaluate_bpb", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    assert eval_bpb.main([str(out / "final_model.int6.ptz"), "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_size_verdict_is_printed_before_the_evaluation(byte_run, monkeypatch, capsys):
    out, _ = byte_run
    t = study02()
    real = t.evaluate_bpb

    def check_then_evaluate(*a, **k):
        assert "size: code" in capsys.readouterr().out
        return real(*a, **k)
    monkeypatch.setattr(t, "evaluate_bpb", check_then_evaluate)
    assert score(out / "final_model.int6.ptz") == 0


# --- the artifact, its tokenizer and its validation split -------------------------------------------

def test_an_artifact_records_its_tokenizer_and_validation_split(byte_run, sample_byte260):
    out, _ = byte_run
    t = study02()
    data = t.read_artifact(out / "final_model.int6.ptz")["data"]
    assert data["tokenizer"] == {"kind": "byte260", "vocab_size": 260}
    assert data["val"]["shards"] == ["fineweb_val_000000.bin"] and data["val"]["tokens"] == [249_261]
    assert f"data:{json.dumps(data)}" in (out / "train.log").read_text()


def test_another_validation_split_is_refused_unless_told(byte_run, tmp_path, capsys):
    out, _ = byte_run
    other = export_docs(SAMPLE, tmp_path / "other", extra=("--num-val-docs", "6"))
    data = other / "datasets" / "fineweb10B_byte260"
    assert score(out / "final_model.int6.ptz", "--data", data) == 2
    err = capsys.readouterr().err
    assert "validation sha256" in err and "--ignore-mismatch" in err
    assert score(out / "final_model.int6.ptz", "--data", data, "--ignore-mismatch") == 0
    assert "WARNING: scored with data other than the artifact's" in capsys.readouterr().out


def test_another_sentencepiece_tokenizer_of_the_same_vocab_is_refused(sp_run, sp_export, tmp_path, capsys):
    other = export_docs(SAMPLE, tmp_path / "other", "sp1024", extra=("--tokenizer-train-docs", "30"))
    model = other / "tokenizers" / "fineweb_1024_bpe.model"
    assert model.read_bytes() != (sp_export / "tokenizers" / "fineweb_1024_bpe.model").read_bytes()
    assert score(sp_run / "final_model.int6.ptz", "--tokenizer", model) == 2
    # the shards' manifest names their tokenizer by sha256: refused before the artifact's own check
    assert "is not the tokenizer fineweb10B_sp1024 was made with" in capsys.readouterr().err
    assert score(sp_run / "final_model.int6.ptz", "--tokenizer", model, "--ignore-mismatch") == 2


def test_an_sp1024_artifact_on_byte260_shards_is_refused_even_when_cut(sp_run, sample_byte260, capsys):
    assert score(sp_run / "final_model.int6.ptz", "--data", sample_byte260, "--val-max-tokens", "5000") == 2
    assert "fineweb10B_byte260 was made with a byte tokenizer" in capsys.readouterr().err


# --- which trainer an artifact may run ------------------------------------------------------------

def test_an_artifact_cannot_choose_a_python_file_outside_the_studies(byte_run, tmp_path, capsys):
    out, _ = byte_run
    t = study02()
    evil = tmp_path / "evil.py"
    evil.write_text("raise SystemExit('executed')\n")
    payload = t.read_artifact(out / "final_model.int6.ptz")
    for study_file in (os.path.relpath(evil, os.getcwd()), "../../" + evil.name, "02_improved_hnet_byte260_and_sp1024/../x.py"):
        payload["trainer"] = {"path": os.path.relpath(evil), "study_file": study_file, "sha256": "0" * 64}
        (tmp_path / "a.ptz").write_bytes(t.compress(payload, "int6"))
        assert score(tmp_path / "a.ptz") == 2
        assert "not a study trainer" in capsys.readouterr().err
    # --trainer names a file the user trusts; here the study's own trainer under its hash
    payload["trainer"] = t.trainer_record()
    (tmp_path / "b.ptz").write_bytes(t.compress(payload, "int6"))
    assert score(tmp_path / "b.ptz", "--trainer", t.__file__) == 0
    assert "(sha256 " in capsys.readouterr().out


# --- partial exports and the manifest ---------------------------------------------------------------

def test_an_interrupted_export_leaves_no_dataset_a_trainer_would_read(tmp_path, monkeypatch):
    ex = load_module("data/download_hf_docs_and_tokenize.py")
    t = study02()
    export_docs(SAMPLE, tmp_path / "e")
    data = tmp_path / "e" / "datasets" / "fineweb10B_byte260"
    before = sorted(p.name for p in data.iterdir())
    calls = {"n": 0}
    real = ex.ShardWriter.add_document

    def failing(self, ids):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real(self, ids)
    monkeypatch.setattr(ex.ShardWriter, "add_document", failing)
    with pytest.raises(KeyboardInterrupt):
        ex.main(["--docs", str(SAMPLE), "--output-root", str(tmp_path / "e"), "--tokenizer-config",
                 str(load_module("train_hnet.py").ROOT / "data" / "tokenizer_specs_byte260.json")])
    assert sorted(p.name for p in data.iterdir()) == before  # the old shards are untouched
    with pytest.raises(t.ConfigError, match="lists no dataset fineweb10B_byte260: its export did not finish"):
        run_tiny(t, data, tmp_path / "r1")
    assert not (tmp_path / "r1").exists()  # a failed start leaves no run folder


def test_shards_are_checked_against_the_manifest(tmp_path):
    t = study02()
    root = export_docs(SAMPLE, tmp_path / "m")
    data = root / "datasets" / "fineweb10B_byte260"
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["datasets"][0]["stats"]["tokens_val"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(t.ConfigError, match="tokens_val is 249,261, .*manifest.json says 249,262"):
        run_tiny(t, data, tmp_path / "r")
    (root / "manifest.json").unlink()
    run, _ = run_tiny(t, data, tmp_path / "r2", ITERATIONS="1")
    assert "WARNING: no manifest.json at" in (tmp_path / "r2" / "train.log").read_text()
    (data / "fineweb_train_000000.bin").rename(data / "fineweb_train_000003.bin")
    with pytest.raises(t.ConfigError, match="not numbered 0..0 .missing fineweb_train_000000.bin"):
        run_tiny(t, data, tmp_path / "r3")


# --- signals ----------------------------------------------------------------------------------------

def test_signals_during_priming_and_a_second_signal_stop_the_run(sample_byte260, tmp_path, monkeypatch):
    # the handlers in place before the run come back after it (under nohup SIGINT starts ignored,
    # so "the default handler" would be the wrong thing to expect)
    t = study02()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real = t.train_step

    def signalled(run, mul, gate):
        os.kill(os.getpid(), signal.SIGINT)
        return real(run, mul, gate)
    monkeypatch.setattr(t, "train_step", signalled)
    with pytest.raises(t.TrainingStopped, match="during compile priming") as info:
        run_tiny(t, sample_byte260, tmp_path / "p", WARMUP_STEPS="2")
    assert info.value.exit_code == 128 + signal.SIGINT
    monkeypatch.setattr(t, "train_step", real)

    def twice(run):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the second signal did not stop the run")
    monkeypatch.setattr(t, "train", twice)
    with pytest.raises(t.TrainingStopped, match="aborted by a second signal"):
        run_tiny(t, sample_byte260, tmp_path / "q")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_export_and_final_evaluation_run_with_the_default_signal_handlers(sample_byte260, tmp_path, monkeypatch):
    t = study02()
    seen, before = {}, signal.getsignal(signal.SIGINT)
    real = t.export_and_evaluate
    monkeypatch.setattr(t, "export_and_evaluate",
                        lambda run: seen.setdefault("h", signal.getsignal(signal.SIGINT)) and real(run))
    run_tiny(t, sample_byte260, tmp_path / "d", ITERATIONS="1")
    assert seen["h"] is before  # the run's own handler is gone: Ctrl-C during export is not swallowed


# --- bytes per token -----------------------------------------------------------------------------------

def test_a_piece_counts_the_bytes_it_decodes_to_every_space_included(tmp_path):
    # SentencePiece decodes every "▁" of a piece to a space: '▁▁▁▁' is four spaces (4 bytes when
    # it follows text), not one space and three 3-byte U+2581s (10 bytes) as the code once counted
    import io

    import sentencepiece as spm

    t = study02()
    assert t.piece_bytes("\u2581\u2581") == (True, 1)
    assert t.piece_bytes("\u2581\u2581\u2581\u2581") == (True, 3)
    assert t.piece_bytes("\u2581the") == (True, 3) and t.piece_bytes("ing") == (False, 3)
    assert t.piece_bytes("\u2581") == (True, 0) and t.piece_bytes("a\u2581b") == (False, 3)
    lines = []
    for i in range(400):  # indented code and runs of spaces, kept as they are (no whitespace folding)
        lines += [f"def f{i}(x):     return x + {i}    # note    here", f"the cat    sat  on   the mat {i}      again"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=320, character_coverage=1.0,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        minloglevel=2, num_threads=1)
    model = tmp_path / "ws.model"
    model.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert {"\u2581\u2581", "\u2581\u2581\u2581\u2581"} <= {sp.id_to_piece(i) for i in range(sp.vocab_size())}
    hp = tiny_hparams(t, VOCAB_SIZE=str(sp.vocab_size()), TOKENIZER_PATH=str(model))
    luts = t.build_byte_luts(hp, torch.device("cpu"))
    for text in ("the cat    dog", "x = 1      # six spaces", "def g(x):     return x    ", "caf\u00e9  \u2603  ok"):
        ids = torch.tensor([[1] + sp.encode(text)])  # BOS first, as in every shard
        counted = t.target_bytes(luts, ids[:, :-1], ids[:, 1:]).sum().item()
        assert counted == len(sp.decode(ids[0, 1:].tolist()).encode("utf-8")) == len(text.encode("utf-8")), text


def test_evaluation_refuses_to_return_a_score_that_is_not_finite():
    t = study02()
    hp = tiny_hparams(t)
    model = t.HNet(hp)
    with torch.no_grad():
        model.tok_emb.weight.fill_(float("nan"))
    rt = t.Runtime(torch.device("cpu"), grad_accum_steps=8)
    luts = t.build_byte_luts(hp, rt.device)
    with pytest.raises(t.NonFiniteScore, match="not finite"):
        t.evaluate_bpb(model, rt, hp, torch.randint(4, 260, (500,)), luts)


# --- what the run reports about itself ------------------------------------------------------------

def test_gptq_calibration_counts_against_the_time_budget_and_an_overrun_is_said(sample_byte260, tmp_path,
                                                                               monkeypatch):
    t = study02()
    run, _ = run_tiny(t, sample_byte260, tmp_path / "ok", ITERATIONS="2")
    sub = json.loads((tmp_path / "ok" / "submission.json").read_text())
    assert sub["gptq_calibration_ms"] == round(run.calibration_ms) and run.calibration_ms > 0
    assert sub["train_time_ms"] == round(run.training_time_ms + run.calibration_ms)  # GPTQ reads training data
    assert sub["within_time_budget"] is True  # no cap: no budget to break
    real = t.collect_hessians

    def slow(run):  # a calibration longer than its reserve
        time.sleep(1.5)
        return real(run)
    monkeypatch.setattr(t, "collect_hessians", slow)
    run, _ = run_tiny(t, sample_byte260, tmp_path / "over", ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="3",
                      GPTQ_RESERVE_SECONDS="1", TRAIN_LOG_EVERY="0")
    log = (tmp_path / "over" / "train.log").read_text()
    assert re.search(r"WARNING: training \(\d+\.\ds\) plus GPTQ calibration \(1\.\ds\) read training data for "
                     r"\d\.\ds, over MAX_WALLCLOCK_SECONDS=3: raise GPTQ_RESERVE_SECONDS", log), log[-2000:]
    sub = json.loads((tmp_path / "over" / "submission.json").read_text())
    assert sub["within_time_budget"] is False and sub["train_time_ms"] > 3000


def test_a_score_on_part_of_validation_says_so(byte_run):
    out, metrics = byte_run
    sub = json.loads((out / "submission.json").read_text())
    total = sum(sub["data"]["val"]["tokens"]) - 1
    assert (sub["val_targets_scored"], sub["val_targets_total"], sub["whole_val_split"]) == (4096, total, False)
    assert f"WARNING: VAL_MAX_TOKENS=4096: every score covers the first 4,096 of {total:,} validation targets" in \
        (out / "train.log").read_text()
