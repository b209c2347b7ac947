"""The bench/ harnesses: their tables are made of the runs they made (tiny models, seconds)."""
import json
import math
import re
from pathlib import Path

import pytest

from conftest import ROOT, export_docs, load_module

TINY = ["MODEL_DIM=32", "NUM_HEADS=2", "NUM_KV_HEADS=1", "NUM_LAYERS=4", "OUTER_LAYERS=1", "TRAIN_SEQ_LEN=64",
        "TRAIN_BATCH_TOKENS=1024", "VAL_MAX_TOKENS=2048", "KEEP_FLOAT_MAX_NUMEL=256", "GPTQ_CALIB_BATCHES=2",
        "EVAL_STRIDE=32", "GPTQ_RESERVE_SECONDS=0"]


def test_minigolf_table_rows_come_from_the_runs_it_made(sample_byte260, tmp_path, capsys):
    minigolf = load_module("bench/minigolf.py")
    logs = tmp_path / "logs"
    code = minigolf.main(["--models", "byte260_hnet,byte260_gpt", "--seconds", "3", "--seeds", "1,2", "--logs", str(logs),
                          *TINY, f"DATA_PATH={sample_byte260}"])
    assert code == 0
    results = json.loads((logs / "results.json").read_text())
    table = (logs / "table.md").read_text()
    capsys_out = capsys.readouterr().out
    assert table in capsys_out
    body = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header row
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in body}
    assert set(rows) == {"byte260_hnet", "byte260_gpt"}
    for name, runs in results.items():
        assert len(runs) == 2 and runs[0]["run_dir"] != runs[1]["run_dir"]
        for r in runs:  # each row's number is the run's own submission
            sub = json.loads((Path(r["run_dir"]) / "submission.json").read_text())
            assert sub["roundtrip_val_bpb"] == r["roundtrip"] and sub["steps"] == r["steps"]
            assert r["epochs"] <= 1.0
            # bytes/s counts the bytes the train tokens stand for, at the validation text's bytes per
            # token (from the float score: val_loss / (val_bpb * ln 2)), not at the vocabulary's mean
            loss, bpb = map(float, re.search(r"final_float val_loss:(\S+) val_bpb:(\S+)",
                                             (Path(r["run_dir"]) / "train.log").read_text()).groups())
            want = r["steps"] * 1024 * loss / (bpb * math.log(2)) / (r["train_ms"] / 1000)
            assert abs(r["train_bytes_per_s"] / want - 1) < 1e-6
        bpbs = [r["roundtrip"] for r in runs]
        mean = sum(bpbs) / 2
        assert rows[name][7] == f"{mean:.4f} ({min(bpbs):.4f}-{max(bpbs):.4f})"
    assert rows["byte260_gpt"][-2] == "-"  # a GPT has no chunks
    # the GPT against the first model, seed by seed: the mean of the two same-seed differences
    hnet, gpt = ({r["seed"]: r["roundtrip"] for r in results[m]} for m in ("byte260_hnet", "byte260_gpt"))
    diffs = [gpt[s] - hnet[s] for s in (1, 2)]
    assert rows["byte260_gpt"][-1].strip(" |") == (f"{sum(diffs) / 2:+.4f} ({min(diffs):+.4f} to {max(diffs):+.4f})")
    assert rows["byte260_hnet"][-1].strip(" |") == "-"
    # --retable rebuilds the same table from results.json, its command line kept
    (logs / "table.md").write_text(table.split("\n\n")[0] + "\n\nstale\n")
    assert minigolf.main(["--retable", "--logs", str(logs)]) == 0
    assert (logs / "table.md").read_text() == table
    assert re.fullmatch(r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\)", rows["byte260_hnet"][10])
    assert (logs / "byte260_gpt_seed2.log").is_file()
    # the runs go in rounds of one seed, each model once a round
    order = re.findall(r"^=== (\S+) seed (\d+)", capsys_out, re.M)
    assert order == [("byte260_hnet", "1"), ("byte260_gpt", "1"), ("byte260_hnet", "2"), ("byte260_gpt", "2")]
    # the demo preset's ITERATIONS=600 is below one epoch of this split: the banner names that cap
    one_epoch = round(results["byte260_hnet"][0]["steps"] / results["byte260_hnet"][0]["epochs"])
    assert f"=== byte260_hnet seed 1: 3 s, at most 600 steps (ITERATIONS; one epoch is {one_epoch})\n" in capsys_out
    # the demo's step-counted LR warmup is off for every model, so no model's budget is mostly warmup
    lines = (logs / "byte260_hnet_seed1.log").read_text().splitlines()
    assert "lr_warmup_steps:0" in lines and "qat_from_step:0" in lines  # not the demo's router recipe


def test_minigolf_one_epoch_is_the_steps_the_trainers_loader_takes_to_read_the_split_once(sample_byte260):
    """A step takes each micro-batch's tokens plus one (its last target), so a pass over the split is
    fewer steps than train tokens // TRAIN_BATCH_TOKENS: the cap must not run into a second pass."""
    from harness import runs

    minigolf = load_module("bench/minigolf.py")
    for model in ("study03_hnet", "study03_gpt:GRAD_ACCUM_STEPS=2"):
        study, env, one_epoch = minigolf.model_env(model, 3, 1, [*TINY, f"DATA_PATH={sample_byte260}"], None)
        t = minigolf.modules.trainer_of(study)
        hp, _ = t.Hyperparameters.from_env(env)
        rt = t.setup_device(hp)
        loader = t.DistributedTokenLoader(hp, rt)
        for _ in range(rt.grad_accum_steps):  # one step: a batch each micro-step
            loader.next_batch()
        per_step = loader.stream.pos  # what one step took from the stream
        assert per_step == runs.stream_tokens_per_step(env) > hp.train_batch_tokens
        total = runs.train_tokens(hp.data_path)
        assert one_epoch * per_step <= total < (one_epoch + 1) * per_step
        assert int(env["ITERATIONS"]) <= one_epoch


def test_combine_pools_later_seeds_of_one_comparison_and_refuses_what_is_not_one(tmp_path):
    """More seeds of a comparison, run in another session, make one table: only the models every
    folder ran (each row's seeds each ran in a round beside the first model), the same settings."""
    minigolf = load_module("bench/minigolf.py")

    def folder(name, seeds, models, seconds=600):
        path = tmp_path / name
        path.mkdir()
        rows = {m: [{"params": 1000, "context_bytes": 512.0, "train_bytes_per_s": 5000.0 + seed, "steps": 700 + seed,
                     "epochs": 0.3, "float": bpb - 0.001, "roundtrip": bpb, "bytes": 9000, "boundaries": None,
                     "seed": seed, "model": m} for seed in seeds]
                for m, bpb in models.items()}
        (path / "results.json").write_text(json.dumps(rows))
        command = (f"python bench/minigolf.py --seconds {seconds} --seeds {','.join(map(str, seeds))} "
                   f"--models {','.join(models)} --docs corpus.jsonl.xz EVAL_SLIDING=0")
        (path / "table.md").write_text(f"`{command}`: mean (min-max)\n\n| table |\n")
        return path

    first = folder("first", [1337, 1], {"study03_gpt": 2.25, "study03_hnet": 2.20, "study03_rule": 2.3})
    second = folder("second", [2], {"study03_gpt": 2.27, "study03_hnet": 2.25})
    out = tmp_path / "pooled"
    assert minigolf.main(["--combine", str(first), str(second), "--logs", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["study03_gpt", "study03_hnet"]  # study03_rule ran at two seeds only
    assert [r["seed"] for r in results["study03_hnet"]] == [1337, 1, 2]
    head, table = (out / "table.md").read_text().split("\n\n", 1)
    assert table == minigolf.table(results) + "\n"
    assert "(seeds 1337, 1) and " in head and "(seeds 2)" in head and "left out: study03_rule" in head
    assert "over seeds 1337,1,2;" in head and "--seeds" not in head.split("`")[3]  # the settings they share
    hnet = next(line for line in table.splitlines() if line.startswith("| study03_hnet |"))
    assert hnet.endswith("| -0.0400 (-0.0500 to -0.0200) |")  # -0.05, -0.05 and -0.02, each against its seed
    refused = {"not one comparison": [first, folder("shorter", [3], {"study03_gpt": 2.3}, seconds=150)],
               "both ran seed 1": [first, folder("again", [1], {"study03_gpt": 2.3})],
               "no model was run in every one": [first, folder("other", [4], {"study02_hnet": 2.3})],
               "not a bench/minigolf.py --logs folder": [first, tmp_path / "missing"]}
    for said, folders in refused.items():
        with pytest.raises(SystemExit, match=said):
            minigolf.main(["--combine", *map(str, folders), "--logs", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit, match="is one of the folders combined"):
        minigolf.main(["--combine", str(first), str(second), "--logs", str(first)])
    assert json.loads((first / "results.json").read_text())["study03_rule"][0]["roundtrip"] == 2.3


def test_every_committed_pooled_table_is_what_its_folders_give_now():
    """A pooled table (bench/minigolf.py --combine) quoted by a README is the combination of the
    committed folders its first line names, byte for byte, results.json included."""
    minigolf = load_module("bench/minigolf.py")
    pooled = [path for path in sorted((ROOT / "bench" / "logs").rglob("table.md"))
              if path.read_text().startswith("`python bench/minigolf.py --combine ")]
    assert len(pooled) >= 2
    for path in pooled:
        m = re.match(r"`python bench/minigolf\.py --combine (.+?) --logs (\S+)`: ", path.read_text())
        assert m and ROOT / m[2] == path.parent, path
        results, head = minigolf.combine([ROOT / f for f in m[1].split()], path.parent)
        assert path.read_text() == f"{head}\n\n{minigolf.table(results)}\n", path
        assert json.loads((path.parent / "results.json").read_text()) == results, path


def test_a_minigolf_arm_is_its_model_with_one_key_changed_run_in_the_same_rounds(sample_byte260, tmp_path, capsys):
    minigolf = load_module("bench/minigolf.py")
    logs = tmp_path / "logs"
    arm = "byte260_hnet:TARGET_AVG_CHUNK_LEN=3"
    assert minigolf.main(["--models", f"byte260_hnet,{arm}", "--seconds", "2", "--seeds", "1", "--logs", str(logs),
                          *TINY, "ITERATIONS=3", f"DATA_PATH={sample_byte260}"]) == 0
    # an ITERATIONS below one epoch is the cap the banner names, not the epoch
    banner = re.findall(r"^=== byte260_hnet seed 1: 2 s, at most (.*)$", capsys.readouterr().out, re.M)
    assert len(banner) == 1 and re.fullmatch(r"3 steps \(ITERATIONS; one epoch is \d+\)", banner[0]), banner
    results = json.loads((logs / "results.json").read_text())
    assert list(results) == ["byte260_hnet", arm]
    base, changed = (logs / "byte260_hnet_seed1.log").read_text(), (logs / "byte260_hnet+TARGET_AVG_CHUNK_LEN-3_seed1.log").read_text()
    assert "target_avg_chunk_len:6.0" in base.splitlines() and "target_avg_chunk_len:3.0" in changed.splitlines()
    # nothing else differs between the two arms' settings
    def settings(text):  # the hyperparameter lines the trainer prints before its first step
        head = text.split("\nstep:", 1)[0].splitlines()
        return {ln for ln in head if re.fullmatch(r"[a-z_0-9]+:\S*", ln) and not ln.startswith(("run_id", "output_dir"))}

    assert settings(base) ^ settings(changed) == {"target_avg_chunk_len:6.0", "target_avg_chunk_len:3.0"}
    assert f"| {arm} |" in (logs / "table.md").read_text()
    # a bad arm is refused before any run starts
    for bad, said in (("byte260_hnet:SMEAR", "is not KEY=VALUE"), ("nope:A=1", "unknown model 'nope'")):
        with pytest.raises(SystemExit):
            minigolf.main(["--models", f"byte260_hnet,{bad}", "--logs", str(tmp_path / "bad"), *TINY])
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit, match="NOT_A_KEY"):
        minigolf.main(["--models", "byte260_hnet,byte260_hnet:NOT_A_KEY=1", "--logs", str(tmp_path / "bad"), *TINY])
    assert not (tmp_path / "bad" / "byte260_hnet_seed1337.log").exists()


def test_the_seed_harness_summary_is_made_of_its_rows(sample_byte260, tmp_path, capsys):
    seeds = load_module("bench/seeds.py")
    logs = tmp_path / "logs"
    assert seeds.main(["--seeds", "5,6", "--steps", "6", "--logs", str(logs), *TINY, "MAX_WALLCLOCK_SECONDS=0",
                       f"DATA_PATH={sample_byte260}"]) == 0
    rows = json.loads((logs / "rows.json").read_text())
    assert [r["seed"] for r in rows] == [5, 6]
    for r in rows:  # each row is its own run's submission
        sub = json.loads((Path(r["run_dir"]) / "submission.json").read_text())
        assert sub["roundtrip_val_bpb"] == r["roundtrip"] and sub["seeds"] == [r["seed"]]
    table = (logs / "table.md").read_text()
    assert table in capsys.readouterr().out
    summary = [c.strip() for c in table.splitlines()[-3].split("|")[2:-1]]
    for (key, fmt), cell in zip(seeds.COLUMNS, summary):
        values = sorted(r[key] for r in rows)
        median = (values[0] + values[1]) / 2
        assert cell == f"{fmt.format(values[0])} / {fmt.format(median)} / {fmt.format(values[1])}", key
    assert rows[0]["roundtrip"] != rows[1]["roundtrip"]  # the seed reached the trainer
    n = sum(r["precision"] >= 0.9 and r["recall"] >= 0.9 for r in rows)
    assert table.splitlines()[-1] == f"aligned (precision and recall >= 0.9): {n} of 2"
    assert "[trainer source omitted:" in (logs / "seed5.log").read_text()  # the commit holds the source


def test_seeds_side_by_side_are_the_same_runs_as_one_after_another(sample_byte260, tmp_path):
    # --jobs 2 trains each seed in a child process on one core: a fixed-step run is the same run
    # (up to the float order of one thread against two), and its own, whatever runs beside it
    seeds = load_module("bench/seeds.py")
    common = ["--seeds", "5,6", "--steps", "4", *TINY, "MAX_WALLCLOCK_SECONDS=0", f"DATA_PATH={sample_byte260}"]
    assert seeds.main(["--logs", str(tmp_path / "one"), *common]) == 0
    assert seeds.main(["--logs", str(tmp_path / "two"), "--jobs", "2", *common]) == 0
    one, two = (json.loads((tmp_path / d / "rows.json").read_text()) for d in ("one", "two"))
    assert [r["seed"] for r in two] == [5, 6] and two[0]["run_dir"] != one[0]["run_dir"]
    for a, b in zip(one, two):
        assert a["steps"] == b["steps"] == 4
        assert abs(a["roundtrip"] - b["roundtrip"]) < 1e-4 and a["bytes_per_chunk"] == pytest.approx(b["bytes_per_chunk"], rel=1e-3)
    assert one[0]["roundtrip"] != one[1]["roundtrip"]
    log = (tmp_path / "two" / "seed6.log").read_text()
    assert "seed:6" in log and "world_size:1" in log
    with pytest.raises(SystemExit, match="cut it short"):  # a run the cap stopped early is not the same run
        seeds.main(["--logs", str(tmp_path / "cut"), "--jobs", "2", "--seeds", "5,6", "--steps", "100000", *TINY,
                    "MAX_WALLCLOCK_SECONDS=1", f"DATA_PATH={sample_byte260}"])


def test_two_seed_sweeps_started_in_the_same_second_never_share_run_folders(sample_byte260, tmp_path, monkeypatch):
    # Two sweeps launched side by side once wrote into one runs/seeds_<second>/seedN and read each
    # other's artifacts. Here the clock is frozen, so only a unique folder name keeps them apart.
    seeds = load_module("bench/seeds.py")
    runs = seeds.runs
    monkeypatch.setattr(seeds, "ROOT", tmp_path)
    monkeypatch.setattr(runs.time, "strftime", lambda fmt, *a: "20260101_000000")
    outputs = []

    def fake_measure(study, env):
        out = Path(env["OUTPUT_DIR"])
        assert not out.exists(), f"{out} is already another sweep's run folder"
        out.mkdir(parents=True)
        (out / "train.log").write_text("log\n")
        outputs.append(out)
        stats = {k: 0.5 for k, _ in seeds.COLUMNS[2:]}
        return {"steps": 1, "roundtrip": 2.0, "run_dir": str(out), "boundaries": stats}
    monkeypatch.setattr(runs, "measure", fake_measure)
    for name in ("a", "b"):
        assert seeds.main(["--seeds", "5", "--logs", str(tmp_path / name), f"DATA_PATH={sample_byte260}"]) == 0
    assert len(outputs) == 2 and outputs[0] != outputs[1]
    for _ in range(2):  # without --logs, each sweep's default table folder is its own too
        assert seeds.main(["--seeds", "5", f"DATA_PATH={sample_byte260}"]) == 0
    assert len(list((tmp_path / "bench" / "logs").glob("seeds_*/table.md"))) == 2
    assert len({runs.unique_stamp() for _ in range(20)}) == 20


def test_router_trajectory_rows_are_each_checkpoints_own_boundaries(sample_byte260, tmp_path, capsys):
    import torch

    import boundaries
    from conftest import run_tiny, study02

    t = study02()
    run, _ = run_tiny(t, sample_byte260, tmp_path / "run", ITERATIONS="4", CHECKPOINT_EVERY="2",
                      GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0", EXPORT_FORMATS="int8")
    trajectory = load_module("bench/router_trajectory.py")
    assert trajectory.main([str(tmp_path / "run"), "--tokens", "2048"]) == 0
    body = [line for line in (tmp_path / "run" / "trajectory.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0].strip("| ") for line in body] == ["2", "4"]
    train_tokens = sum(t.load_data_shard(f).numel() for f in t.shard_files(run.hp, "train"))
    for line, step in zip(body, (2, 4)):  # recompute each row from its checkpoint
        model = t.HNet(run.hp).eval()
        model.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / f"step_{step:06d}.pt",
                                         weights_only=True)["model"])
        c = boundaries.collect(model, run.hp, run.val_tokens, torch.device("cpu"), 2048)
        b = boundaries.mask_stats(c.mask, boundaries.targets(t, run.hp, c.tokens), True)
        cells = line.strip("| ").split(" | ")
        assert cells[1] == f"{step * 1024 / train_tokens:.2f}"
        assert cells[2:5] == [f"{b['tokens_per_chunk']:.2f}", f"{b['precision']:.3f}", f"{b['recall']:.3f}"]
    with pytest.raises(SystemExit) as e:  # a folder that is not a run is refused by name
        trajectory.main([str(tmp_path)])
    assert e.value.code == 2 and "no train.log" in capsys.readouterr().err


def test_first_step_all_column_is_the_trainers_first_step(sample_byte260, tmp_path):
    import torch

    from conftest import TINY_ENV, final_state, run_tiny, study02

    t = study02()
    run, _ = run_tiny(t, sample_byte260, tmp_path / "run", ITERATIONS="1", GPTQ_CALIB_BATCHES="0",
                      EVAL_SLIDING="0", EXPORT_FORMATS="int8", LR_WARMUP_STEPS="3")
    first_step = load_module("bench/first_step.py")
    row = first_step.first_step(t, {**TINY_ENV, "DATA_PATH": str(sample_byte260), "ITERATIONS": "1",
                                    "LR_WARMUP_STEPS": "3"})
    model = t.HNet(run.hp)
    model.load_state_dict(final_state(tmp_path / "run"))
    loader = t.DistributedTokenLoader(run.hp, t.Runtime(torch.device("cpu")))
    batches = [loader.next_batch() for _ in range(8)]
    assert row["all"] == first_step.boundary_fraction(model, batches)  # the same update as the trainer's
    torch.manual_seed(run.hp.seed)
    assert row["init"] == first_step.boundary_fraction(t.HNet(run.hp), batches)
    assert len({row[g] for g in first_step.GROUPS}) == 3  # each optimiser's step alone is its own


def test_bench_hnet_times_the_trainers_own_step_and_the_scan_against_a_loop(tmp_path, capsys):
    bench = load_module("bench/bench_hnet.py")
    out = tmp_path / "speed.md"
    assert bench.main(["--dim", "32", "--layers", "4", "--outer", "1", "--heads", "2", "--kv-heads", "1",
                       "--seq", "64", "--steps", "2", "--warmup", "1", "--scan-length", "256", "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    t = load_module("studies/02_improved_hnet_byte260_and_sp1024/train_gpt.py")
    for label, outer in (("H-Net (outer 1)", "1"), ("GPT (OUTER_LAYERS=0)", "0")):
        hp, _ = t.Hyperparameters.from_env({"MODEL_DIM": "32", "NUM_LAYERS": "4", "OUTER_LAYERS": outer,
                                            "NUM_HEADS": "2", "NUM_KV_HEADS": "1"})
        assert rows[label][1] == f"{sum(p.numel() for p in t.HNet(hp).parameters()):,}"
        ms, rate = float(rows[label][2]), float(rows[label][3].replace(",", ""))
        assert rate == pytest.approx(8 * 64 / (ms / 1000), rel=0.01)  # bytes/s is the step's tokens over its time
    ratio = float(re.search(r"H-Net \(outer 1\) / GPT bytes per second: (\S+)x", text).group(1))
    hnet, gpt = (float(rows[k][3].replace(",", "")) for k in ("H-Net (outer 1)", "GPT (OUTER_LAYERS=0)"))
    assert ratio == pytest.approx(hnet / gpt, abs=0.006)
    assert float(re.search(r"max \|scan - loop\| = (\S+)", text).group(1)) < 1e-4
    assert {"log-depth scan (trainer)", "python loop over chunks"} <= set(rows)


def test_bench_hnet_times_study_03s_named_pair_on_its_own_data(sample_byte260, tmp_path, capsys):
    # --run/--gpt-run time the mini-golf models as runs.json defines them (every study-03 key), on
    # the run's own shards, with the bytes per chunk of the timed steps and the cost model's FLOPs
    from harness import cost, modules

    bench = load_module("bench/bench_hnet.py")
    small = ["MODEL_DIM=32", "NUM_HEADS=2", "NUM_KV_HEADS=1", "NUM_LAYERS=6", "TRAIN_SEQ_LEN=64",
             "TRAIN_BATCH_TOKENS=512", "EVAL_STRIDE=32", "BIGRAM_HASH=64", f"DATA_PATH={sample_byte260}"]
    assert bench.main(["--study", "03", "--run", "cpu", "--gpt-run", "cpu_gpt", "--steps", "2", "--warmup", "0",
                       "--scan-length", "256", *small]) == 0
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    t = load_module("studies/03_byte_hnet_vs_byte_gpt/train_gpt.py")
    study = modules.study_dir("03")
    for label, run, outer in (("H-Net (cpu)", "cpu", 2), ("GPT (cpu_gpt)", "cpu_gpt", 0)):
        env, _ = modules.run_env(study, run, [*small, "MAX_WALLCLOCK_SECONDS=0", "WARMUP_STEPS=0"])
        hp, _ = t.Hyperparameters.from_env(env)
        assert hp.bigram_hash == 64 and hp.smear_gate == 1 and hp.outer_layers == outer
        assert rows[label][1] == f"{sum(p.numel() for p in t.HNet(hp).parameters()):,}"
        assert rows[label][5] == f"{cost.cost_model(t, hp)['flops_per_byte'] / 1e6:.2f} M"
    assert 1.0 < float(rows["H-Net (cpu)"][4]) < 64 and rows["GPT (cpu_gpt)"][4] == "-"
    # the rule router's row chunks at a trained run's rate (a boundary after each space: about 5.8
    # bytes on English), whatever the learned router does at its initialisation
    assert 4.0 < float(rows["H-Net (cpu, ROUTER=space)"][4]) < 8.0
    assert len(re.findall(r"^H-Net \(cpu(, ROUTER=space)?\) / GPT bytes per second: \d+\.\d\dx", text, re.M)) == 2
    assert f"the run's training shards ({sample_byte260})" in text
    with pytest.raises(SystemExit):  # overrides only mean something for a named run
        bench.main(["MODEL_DIM=32"])


def test_a_committed_log_names_its_trainer_by_sha256_and_keeps_everything_else(sample_byte260, tmp_path):
    import hashlib

    from conftest import run_tiny, study02
    from harness import files

    t = study02()
    run_tiny(t, sample_byte260, tmp_path / "run", ITERATIONS="1", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0")
    text = (tmp_path / "run" / "train.log").read_text()
    stripped = files.log_without_source(text)
    digest = hashlib.sha256(Path(t.__file__).read_bytes()).hexdigest()
    first, rest = stripped.split("\n", 1)
    assert first.startswith("[trainer source omitted:") and digest in first  # `git show REV:path | sha256sum`
    assert rest.split("=" * 100 + "\n", 1)[1] == text.split("\n" + "=" * 100 + "\n", 1)[1]  # the rest, as written
    assert len(stripped) < len(text) - 50_000 and files.log_without_source(stripped) == stripped


def test_the_figure_reads_each_models_validation_lines_from_its_logs(tmp_path):
    figure = load_module("bench/minigolf_figure.py")
    for seed, bpbs in ((1, (3.0, 2.6, 2.4)), (2, (3.2, 2.8, 2.2))):
        lines = [f"step:{50 * i}/300 val_loss:1.0 val_bpb:{b} train_time:{1000 * (i + 1) * seed}ms step_avg:1ms"
                 for i, b in enumerate(bpbs)]
        (tmp_path / f"study03_hnet_seed{seed}.log").write_text("source\n" + "\n".join(lines) + "\nfinal_float x\n")
    (tmp_path / "table.md").write_text("| not a log |")
    data = figure.curves(tmp_path)
    assert data == {"study03_hnet": {1: [(1.0, 3.0), (2.0, 2.6), (3.0, 2.4)], 2: [(2.0, 3.2), (4.0, 2.8), (6.0, 2.2)]}}
    assert figure.mean_curve(data["study03_hnet"]) == [(1.5, 3.1), (3.0, 2.7), (4.5, 2.3)]
    # at equal steps: an arm's value at step 50 and its difference from the base, seed by seed
    for seed, bpb in ((1, 2.5), (2, 2.9)):
        (tmp_path / f"study03_hnet+SMEAR_GATE-0_seed{seed}.log").write_text(
            f"step:50/300 val_loss:1.0 val_bpb:{bpb} train_time:9ms step_avg:1ms\n")
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
            for line in figure.at_step(tmp_path, 50, "study03_hnet").splitlines()[2:]}
    assert rows["study03_hnet"] == ["study03_hnet", "1, 2", "2.7000 (2.6000-2.8000)", "-", "?"]  # no WARMDOWN_ITERS
    assert rows["study03_hnet+SMEAR_GATE-0"][2:] == ["2.7000 (2.5000-2.9000)", "+0.0000 (-0.1000 to +0.1000)", "?"]
    with pytest.raises(SystemExit, match="--base nope"):
        figure.at_step(tmp_path, 50, "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no <model>_seed<S>.log with validation lines"):
        figure.curves(tmp_path / "empty")
    assert figure.main([str(tmp_path), "--at-step", "50", "--base", "study03_hnet", "--write"]) == 0
    written = (tmp_path / "at_step50_vs_study03_hnet.md").read_text()
    command = f"python bench/minigolf_figure.py {tmp_path.as_posix()} --at-step 50 --base study03_hnet"
    assert written.startswith(f"`{command}`: ")
    assert written.endswith("\n\n" + figure.at_step(tmp_path, 50, "study03_hnet") + "\n")
    # a second base (an arm's own base, say) gets its own file and leaves the first one as it was
    assert figure.main([str(tmp_path), "--at-step", "50", "--base", "study03_hnet+SMEAR_GATE-0", "--write"]) == 0
    assert figure.main([str(tmp_path), "--at-step", "50", "--write"]) == 0
    assert sorted(p.name for p in tmp_path.glob("at_step*.md")) == [
        "at_step50.md", "at_step50_vs_study03_hnet+SMEAR_GATE-0.md", "at_step50_vs_study03_hnet.md"]
    assert (tmp_path / "at_step50_vs_study03_hnet.md").read_text() == written
    assert "minus study03_hnet+SMEAR_GATE-0's" in (tmp_path / "at_step50_vs_study03_hnet+SMEAR_GATE-0.md").read_text()
    assert "minus" not in (tmp_path / "at_step50.md").read_text()


def test_the_step_table_names_the_seeds_already_in_their_warmdown(tmp_path):
    """Validation BPB at equal steps compares learning only before the warmdown: a run whose LR is
    already falling scores lower at once, so the table says which seeds are past their start."""
    figure = load_module("bench/minigolf_figure.py")
    for model, seed, last in (("study03_hnet", 1, 400), ("study03_hnet", 2, 300), ("study03_gpt", 1, 250)):
        vals = [f"step:{s}/2566 val_loss:1.0 val_bpb:2.0 train_time:{s}ms step_avg:1ms" for s in (100, 200, last)]
        (tmp_path / f"{model}_seed{seed}.log").write_text("\n".join(["warmdown_iters:150", *vals]) + "\n")
    assert figure.warmdown_start("warmdown_iters:150\nstep:120/9 val_loss:1 val_bpb:2 train_time:1ms\n") == 0
    assert figure.warmdown_start("step:120/9 val_loss:1 val_bpb:2 train_time:1ms\n") is None
    last = {line.strip("| ").split(" | ")[0]: line.strip("| ").split(" | ")[-1]
            for line in figure.at_step(tmp_path, 200, "study03_hnet").splitlines()[2:]}
    assert last == {"study03_hnet": "2 (from 150)", "study03_gpt": "1 (from 100)"}  # seed 1's H-Net: from 250
    last = {line.strip("| ").split(" | ")[0]: line.strip("| ").split(" | ")[-1]
            for line in figure.at_step(tmp_path, 100, None).splitlines()[2:]}
    assert last == {"study03_hnet": "none", "study03_gpt": "none"}  # step 100 is a warmdown's first step: not in it


def test_the_swing_table_measures_the_change_between_neighbouring_validations(tmp_path):
    import statistics

    figure = load_module("bench/minigolf_figure.py")
    bpbs = [3.0, 2.5, 2.6, 2.4, 2.6, 2.3, 2.35]  # steps 0, 50, ..., 300
    lines = [f"step:{50 * i}/400 val_loss:1.0 val_bpb:{b} train_time:{i}ms step_avg:1ms" for i, b in enumerate(bpbs)]
    lines.append("step:333/400 val_loss:1.0 val_bpb:1.0 train_time:9ms step_avg:1ms")  # the end, off the interval
    (tmp_path / "study03_hnet_seed1.log").write_text("\n".join(lines) + "\n")
    changes = [-0.2, 0.2, -0.3, 0.05]  # from step 100 on: 2.6, 2.4, 2.6, 2.3, 2.35
    assert figure.swing(tmp_path, 100).splitlines()[2:] == [
        f"| study03_hnet | 1 | 4 | {statistics.stdev(changes):.4f} | 0.3000 |"]
    assert figure.swing(tmp_path, 200).splitlines()[2:] == ["| study03_hnet | 0 | - | - | - |"]  # too few changes
    assert figure.main([str(tmp_path), "--swing", "100", "--write"]) == 0
    assert (tmp_path / "swing.md").read_text() == figure.swing_file(tmp_path, 100)


def test_the_schedule_table_recomputes_the_trainers_warmdown_from_the_log(tmp_path):
    """The LR multiplier a run met after each validation, from the log alone: by steps when ITERATIONS
    ends the run, by the clock (time left over WARMDOWN_ITERS mean steps) when the cap comes first,
    with GPTQ's reserve taken from the cap only when an int6 export calibrates."""
    figure = load_module("bench/minigolf_figure.py")
    settings = ["iterations:1000", "warmdown_iters:100", "max_wallclock_seconds:100.0", "gptq_reserve_seconds:10.0",
                "export_formats:int6", "gptq_calib_batches:8"]
    # 100 ms a step: the clock's warmdown (100 steps = 10 s) starts at 80 s of the 90 s left, step 800
    vals = [f"step:{s}/1000 val_loss:1.0 val_bpb:{3 - s / 1000} train_time:{100 * s}ms step_avg:100ms"
            for s in (0, 700, 850, 900)]
    text = "\n".join(["[trainer source omitted]", *settings, *vals]) + "\n"
    assert figure.lr_multipliers(text) == pytest.approx({0: 1.0, 700: 1.0, 850: 0.5, 900: 0.0})
    by_steps = text.replace("iterations:1000", "iterations:860").replace("max_wallclock_seconds:100.0",
                                                                         "max_wallclock_seconds:0.0")
    assert figure.lr_multipliers(by_steps) == pytest.approx({0: 1.0, 700: 1.0, 850: 0.1, 900: 0.0})
    no_gptq = text.replace("gptq_calib_batches:8", "gptq_calib_batches:0")  # no reserve: the cap is 100 s
    assert [figure.lr_multipliers(no_gptq)[s] for s in (850, 900)] == pytest.approx([1.0, 1.0])
    assert figure.lr_multipliers(text.replace("warmdown_iters:100\n", "")) is None
    (tmp_path / "study03_hnet_seed1.log").write_text(text)
    rows = [line.split(" | ") for line in figure.schedule(tmp_path, 850).splitlines()[2:]]
    assert [r[2:] for r in rows] == [["850", "0.50", "2.1500", "-0.1500 |"], ["900", "0.00", "2.1000", "-0.0500 |"]]
    assert figure.main([str(tmp_path), "--schedule", "850", "--write"]) == 0
    assert (tmp_path / "schedule.md").read_text() == figure.schedule_file(tmp_path, 850)


def test_the_seconds_table_reads_each_run_where_its_line_crosses_that_time(tmp_path):
    """At equal training seconds (the bench's footing): linear between the validations either side,
    with the step reached; a run that stopped earlier is left out, not read at its end."""
    figure = load_module("bench/minigolf_figure.py")
    runs = {("study03_gpt", 1): [(0, 0, 3.0), (50, 40_000, 2.6), (100, 80_000, 2.4)],
            ("study03_gpt", 2): [(0, 0, 3.0), (50, 50_000, 2.8), (80, 80_000, 2.7)],
            ("study03_hnet", 1): [(0, 0, 3.0), (50, 25_000, 2.7), (100, 50_000, 2.5), (150, 75_000, 2.3)],
            ("study03_hnet", 2): [(0, 0, 3.0), (50, 25_000, 2.9), (100, 50_000, 2.7), (150, 75_000, 2.5)]}
    # the GPT's logs print the settings the warmdown needs: a 100 s cap, 50 steps of warmdown
    gpt_settings = "iterations:300\nwarmdown_iters:50\nmax_wallclock_seconds:100.0\ngptq_reserve_seconds:10.0\n" \
                   "export_formats:int6\ngptq_calib_batches:0\n"  # no calibration: no reserve
    for (model, seed), points in runs.items():
        (tmp_path / f"{model}_seed{seed}.log").write_text((gpt_settings if model == "study03_gpt" else "") + "".join(
            f"step:{s}/300 val_loss:1.0 val_bpb:{b} train_time:{ms}ms step_avg:1ms\n" for s, ms, b in points))
    assert figure.interpolate([(0, 0.0, 3.0), (50, 40.0, 2.6)], 30.0) == pytest.approx((37.5, 2.7))
    assert figure.interpolate([(0, 0.0, 3.0), (50, 40.0, 2.6)], 41.0) is None
    # at 60 s: the GPT's seed 1 is at step 75 (2.5), seed 2 at step 60 (2.7667); the H-Net's runs
    # are at step 120 (2.42 and 2.62). The GPT's warmdown is 50 mean steps before the 100 s cap:
    # 40 s for seed 1 (0.8 s a step), full LR at 60 s; 50 s for seed 2 (1 s a step), 40/50 = 0.8
    rows = [line.strip("| ").split(" | ") for line in figure.at_seconds(tmp_path, 60, "study03_gpt").splitlines()[2:]]
    assert rows == [["study03_gpt", "1, 2", "68 (60-75)", "2.6333 (2.5000-2.7667)", "0.90 (0.80-1.00)", "-"],
                    ["study03_hnet", "1, 2", "120 (120-120)", "2.5200 (2.4200-2.6200)", "?",  # no settings
                     "-0.1133 (-0.1467 to -0.0800)"]]
    # at 78 s the H-Net's runs have stopped (at 75 s): no reading, and no difference to take
    rows = [line.strip("| ").split(" | ") for line in figure.at_seconds(tmp_path, 78, "study03_gpt").splitlines()[2:]]
    assert rows[1] == ["study03_hnet", "none", "-", "-", "-", "-"]
    with pytest.raises(SystemExit, match="--base nope"):
        figure.at_seconds(tmp_path, 60, "nope")
    assert figure.main([str(tmp_path), "--at-seconds", "60", "--base", "study03_gpt", "--write"]) == 0
    written = (tmp_path / "at_seconds60_vs_study03_gpt.md").read_text()
    assert written == figure.readout_file(tmp_path, "seconds", 60, "study03_gpt")
    assert written.startswith(f"`python bench/minigolf_figure.py {tmp_path.as_posix()} --at-seconds 60 --base study03_gpt`: ")
    for argv in (["--at-seconds", "60", "--at-step", "50"], ["--base", "study03_gpt", "--out", "x.png"]):
        with pytest.raises(SystemExit):
            figure.main([str(tmp_path), *argv])


def test_every_committed_at_step_table_is_what_its_logs_give_now():
    """The READMEs quote the at_step<N>[_vs_<base>].md and at_seconds<T>[_vs_<base>].md files; each
    must be the script's output on its folder's committed logs, byte for byte, with the command in
    its first line and its base in its name."""
    figure = load_module("bench/minigolf_figure.py")
    tables = sorted((ROOT / "bench" / "logs").rglob("at_s*.md"))
    assert len(tables) >= 20
    for path in tables:
        m = re.fullmatch(r"`python bench/minigolf_figure\.py (\S+) --at-(step|seconds) (\d+)(?: --base (\S+))?`: .*",
                         path.read_text().split("\n", 1)[0])
        assert m and ROOT / m[1] == path.parent and path.name == figure.readout_name(m[2], int(m[3]), m[4]), path
        assert figure.readout_file(path.parent, m[2], int(m[3]), m[4]) == path.read_text(), path
    # and the swing and schedule tables likewise
    for name, flag, make in (("swing.md", "--swing", figure.swing_file),
                             ("schedule.md", "--schedule", figure.schedule_file)):
        for path in sorted((ROOT / "bench" / "logs").rglob(name)):
            first = path.read_text().split("\n", 1)[0]
            m = re.fullmatch(rf"`python bench/minigolf_figure\.py (\S+) {flag} (\d+)`: .*", first)
            assert m and ROOT / m[1] == path.parent, path
            assert make(path.parent, int(m[2])) == path.read_text(), path


def test_the_router_float_arm_quantises_everything_but_the_router():
    import torch

    from conftest import study02, tiny_hparams

    t = study02()
    bench = load_module("bench/qat_router.py")
    model = t.HNet(tiny_hparams(t, KEEP_FLOAT_MAX_NUMEL="0"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # off the identity, so int6 rounding moves the router's q/k
    router = (model.routing.q_proj, model.routing.k_proj)
    t.refresh_qat(model, True, False)
    assert all(lin.qat_delta.abs().max() > 0 for lin in router)  # the trainer's QAT rounds the router too
    bench.router_left_float(t.refresh_qat)(model, True, False)
    assert all(lin.qat_delta.abs().max() == 0 for lin in router)
    others = [m for m in model.modules() if isinstance(m, t.CastedLinear) and m not in router]
    assert others and all(m.qat_delta.abs().max() > 0 for m in others)


def test_the_codec_bench_measures_the_codecs_the_trainers_write(sample_byte260, tmp_path, capsys):
    # its baseline row is the published codec (a study-02 artifact's own size) and its grouped row is
    # what study 03 writes with EXPORT_CODEC=grouped (that artifact's own size), from the same payload
    from conftest import STUDY03_ON, run_tiny, study, study02

    run_tiny(study02(), sample_byte260, tmp_path / "s02", ITERATIONS="2", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0")
    run_tiny(study("03"), sample_byte260, tmp_path / "s03", ITERATIONS="2", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0",
             **STUDY03_ON)
    codecs = load_module("bench/codecs.py")
    a02, a03 = (tmp_path / d / "final_model.int6.ptz" for d in ("s02", "s03"))
    out = tmp_path / "codecs.md"
    assert codecs.main([str(a02), str(a03), "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): [c.strip("| ") for c in line.split(" | ")[1:]]
            for line in text.splitlines() if line.startswith("| ")}
    num = lambda cell: int(cell.replace(",", ""))
    assert num(rows["torch.save + zstd-22"][0]) == a02.stat().st_size  # the published int6 format, exactly
    assert num(rows["study 03 EXPORT_CODEC=grouped (written, with its header)"][1]) == a03.stat().st_size
    best = "grouped, best of the two a stream, shuffled (streams only)"
    for i in (0, 1):  # the best of two per stream is no larger than either codec alone
        alone = [num(rows[f"grouped, {c}, shuffled (streams only)"][i]) for c in ("zstd-22", "lzma")]
        assert num(rows[best][i]) <= min(alone)
    flipped = bytearray(a02.read_bytes())
    flipped[len(flipped) // 2] ^= 1
    (tmp_path / "bad.ptz").write_bytes(bytes(flipped))
    assert codecs.main([str(tmp_path / "bad.ptz")]) == 2
    assert "bad.ptz" in capsys.readouterr().err


def stretch_docs(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A documents file of two validation speeches and five training pieces of known years, with
    its .meta.json, as make_sample.py writes them."""
    import lzma

    val = [{"text": "Validation one.", "year": 2015, "president": "B"},
           {"text": "Validation two é.", "year": 2016, "president": "B"}]
    train = [{"text": "a" * 20, "year": 1800, "president": "W"}, {"text": "é" * 7, "year": 2010, "president": "B"},
             {"text": "c" * 30, "year": 1950, "president": "T"}, {"text": "d" * 5, "year": 2012, "president": "B"},
             {"text": "e" * 12, "year": 1990, "president": "C"}]
    path = tmp_path / "tiny_docs.jsonl.xz"
    path.write_bytes(lzma.compress("".join(json.dumps(d) + "\n" for d in val + train).encode()))
    (tmp_path / "tiny_docs.meta.json").write_text(json.dumps({"docs_val": 2}))
    return path, train


def test_order_stretch_gives_each_training_byte_the_year_of_its_document(tmp_path, monkeypatch, capsys):
    stretch = load_module("bench/order_stretch.py")
    path, train = stretch_docs(tmp_path)
    monkeypatch.setattr(stretch.runs, "export_corpus",
                        lambda docs: {"DATA_PATH": str(export_docs(docs, tmp_path / "export") / "datasets" /
                                                       "fineweb10B_byte260")})
    # the stream as the trainer reads it: a BOS, then the UTF-8 bytes, document after document
    years = [y for d in train for y in [None] + [d["year"]] * len(d["text"].encode("utf-8"))]
    per_step = 2 * (8 // 2 + 1)  # --batch-tokens 8 --micro-steps 2: 2 micro-batches of 4 + 1 tokens
    assert stretch.main([str(path), "--steps", "0,3,6", "--batch-tokens", "8", "--micro-steps", "2",
                         "--out", str(tmp_path / "out.md")]) == 0
    out = (tmp_path / "out.md").read_text()
    assert capsys.readouterr().out.endswith(out + "\n")  # printed, after the exporter's own lines
    assert out.startswith(f"`python bench/order_stretch.py {path} --steps 0,3,6")  # the command that made it
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| steps")]
    steps_in_pass = len(years) // per_step
    assert f"{steps_in_pass:,} steps in one pass" in out
    for row, (a, b) in zip(rows, [(0, 3), (3, 6), (0, steps_in_pass)]):
        span = [y for y in years[a * per_step:min(b, steps_in_pass) * per_step] if y is not None]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1].replace(",", "")) == len(span)
        assert int(cells[2]) == round(sum(span) / len(span))
        assert [float(c.rstrip("%")) for c in cells[3:7]] == pytest.approx(
            [100 * sum(lo <= y <= hi for y in span) / len(span) for lo, hi in stretch.ERAS], abs=0.05)
        # the last training president is B (2012): his pieces are the 2010 and 2012 ones
        assert float(cells[7].rstrip("%")) == pytest.approx(100 * sum(y in (2010, 2012) for y in span) / len(span), abs=0.05)


def test_order_stretch_refuses_shards_that_are_not_the_documents_file(tmp_path):
    import numpy as np

    stretch = load_module("bench/order_stretch.py")
    _, train = stretch_docs(tmp_path)
    stream = np.concatenate([[1, *(np.frombuffer(d["text"].encode(), np.uint8) + 4)] for d in train]).astype(np.uint16)
    assert len(stretch.stretch_rows(stream, train, 5, [0, 1])) == 2
    with pytest.raises(SystemExit, match="5 documents"):
        stretch.stretch_rows(stream, train[:4], 5, [0, 1])  # one document more in the shards than the file
    swapped = [train[1], train[0], *train[2:]]
    with pytest.raises(SystemExit, match="first training document"):
        stretch.stretch_rows(stream, swapped, 5, [0, 1])


def test_order_stretch_falls_are_each_models_mean_before_its_warmdown(tmp_path, monkeypatch):
    stretch = load_module("bench/order_stretch.py")
    runs = tmp_path / "runs"
    runs.mkdir()

    def log(name, val, warmdown=100):
        lines = [f"warmdown_iters:{warmdown}"] + [f"step:{s}/9999 val_loss:1.0 val_bpb:{v} train_time:{s}ms"
                                                  for s, v in val.items()]
        (runs / name).write_text("\n".join(lines) + "\n")

    log("hnet_seed1.log", {0: 3.0, 100: 2.5, 200: 2.4, 300: 2.0})  # warmdown from step 200
    log("hnet_seed2.log", {0: 3.2, 100: 2.9, 200: 2.6, 300: 2.5, 400: 2.1})  # from step 300
    log("gpt_seed1.log", {0: 3.0, 100: 2.0})
    falls = stretch.read_falls([runs], [0, 100, 200, 300])
    # 0-100: (0.5 + 0.3) / 2; 100-200: seed 1's 0.1 and seed 2's 0.3; 200-300 ends in seed 1's
    # warmdown, so seed 2's 0.1 alone
    assert falls["hnet"] == pytest.approx([0.4, 0.2, 0.1])
    assert falls["gpt"] == [None, None, None]  # its one stretch ends in its warmdown
    (runs / "broken_seed1.log").write_text("step:0/9 val_loss:1 val_bpb:3.0 train_time:0ms\n")
    with pytest.raises(SystemExit, match="broken_seed1.log does not print warmdown_iters"):
        stretch.read_falls([runs], [0, 100])
