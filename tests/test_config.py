"""Configuration from environment variables: typed, checked, loud about mistakes."""
import pytest

from conftest import study01, study02


def test_defaults_are_the_headline_hnet_not_a_plain_gpt():
    t = study02()
    hp, warnings = t.Hyperparameters.from_env({})
    assert hp.outer_layers == 3 and hp.num_layers == 12 and hp.train_seq_len == 2048
    assert hp.chunk_divisor == 4 and hp.target_avg_chunk_len == 6 and hp.ratio_loss_weight == 0.05
    assert hp.is_hnet and warnings == []


def test_values_are_typed():
    t = study02()
    hp, _ = t.Hyperparameters.from_env({"MODEL_DIM": "256", "MATRIX_LR": "0.02", "RUN_ID": "abc"})
    assert hp.model_dim == 256 and isinstance(hp.model_dim, int)
    assert hp.matrix_lr == 0.02 and hp.run_id == "abc"


@pytest.mark.parametrize("env, match", [
    ({"MODEL_DIM": "5x12"}, "MODEL_DIM='5x12' is not a valid int"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR='fast' is not a valid float"),
    ({"HNET_LR_DIF": "0.5"}, "unknown variable HNET_LR_DIF: did you mean HNET_LR_DIFF\\?"),
    ({"OUTER_LAYER": "2"}, "unknown variable OUTER_LAYER: did you mean OUTER_LAYERS\\?"),
    ({"OUTER_LAYERS": "6"}, "OUTER_LAYERS=6 leaves no main stage"),
    ({"NUM_HEADS": "7"}, "MODEL_DIM=512 must divide by NUM_HEADS=7"),
    ({"VOCAB_SIZE": "70000"}, "uint16"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096 exceeds TRAIN_SEQ_LEN"),
])
def test_bad_values_name_the_variable(env, match):
    t = study02()
    with pytest.raises(t.ConfigError, match=match):
        t.Hyperparameters.from_env(env)


@pytest.mark.parametrize("study", ["01", "02"])
def test_a_typo_of_a_known_name_is_an_error_and_a_clusters_variables_are_not(study):
    t = study01() if study == "01" else study02()
    for typo, meant in (("NUM_LAYER", "NUM_LAYERS"), ("SEQ_LEN", "TRAIN_SEQ_LEN"), ("TRIAN_SEQ_LEN", "TRAIN_SEQ_LEN"),
                        ("VAL_MAX_TOKEN", "VAL_MAX_TOKENS"), ("HNET_LR_DIF", "HNET_LR_DIFF")):
        with pytest.raises(t.ConfigError, match=f"unknown variable {typo}: did you mean {meant}\\?"):
            t.Hyperparameters.from_env({typo: "3"})
    # what torchrun, a scheduler, a shell or a logger sets beside us is none of the trainer's business,
    # prefixes like ours included (the trainer once refused LR_SCHEDULER and TRAIN_DATA)
    cluster = {name: "1" for name in (
        "HOME", "PATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "OMP_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "SLURM_JOB_ID", "SLURM_PROCID", "WANDB_PROJECT", "LR_SCHEDULER",
        "TRAIN_DATA", "EVAL_MODE", "VAL_SPLIT", "COMPILE_CACHE", "GRAD_SCALER", "CHECKPOINT_DIR", "EXPORT_PATH")}
    hp, warnings = t.Hyperparameters.from_env(cluster)
    assert warnings == [] and hp == t.Hyperparameters.from_env({})[0]
    with pytest.raises(t.ConfigError, match="unknown variable GPTQ_CALIBRATION"):  # a prefix only we use
        t.Hyperparameters.from_env({"GPTQ_CALIBRATION": "1"})


@pytest.mark.parametrize("env, match", [
    ({"ITERATIONS": "0"}, "ITERATIONS must be a positive integer, got 0"),
    ({"ITERATIONS": "-5"}, "ITERATIONS must be a positive integer"),
    ({"RATIO_LOSS_WEIGHT": "-0.1"}, "RATIO_LOSS_WEIGHT must be >= 0"),
    ({"WARMDOWN_ITERS": "-1"}, "WARMDOWN_ITERS must be >= 0"),
    ({"LR_WARMUP_STEPS": "-3"}, "LR_WARMUP_STEPS must be >= 0"),
    ({"LATE_QAT_THRESHOLD": "1.5"}, "LATE_QAT_THRESHOLD must be in \\[0, 1\\]"),
    ({"LATE_QAT_THRESHOLD": "-0.1"}, "LATE_QAT_THRESHOLD must be in"),
    ({"EVAL_SLIDING": "2"}, "EVAL_SLIDING must be 0 or 1"),
    ({"COMPILE_MODEL": "3"}, "COMPILE_MODEL must be -1"),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, "MAX_WALLCLOCK_SECONDS must be >= 0"),
    ({"GPTQ_DAMP": "0"}, "GPTQ_DAMP must be positive"),
])
def test_values_that_would_train_nothing_or_nonsense_are_refused(env, match):
    t = study02()
    with pytest.raises(t.ConfigError, match=match):
        t.Hyperparameters.from_env(env)


def test_study_01_names_the_study_02_variables_it_does_not_have():
    t = study01()
    with pytest.raises(t.ConfigError, match="EVAL_STRIDE: it is a study 02 variable"):
        t.Hyperparameters.from_env({"EVAL_STRIDE": "64"})


def test_batch_must_split_over_eight_micro_steps():
    t = study02()
    hp, _ = t.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "1000", "TRAIN_SEQ_LEN": "64"})
    with pytest.raises(t.ConfigError, match="TRAIN_BATCH_TOKENS=1000 must be a multiple of .* TRAIN_SEQ_LEN = 512"):
        t.setup_device(hp)
    assert t.setup_device(hp, train=False).world_size == 1  # evaluation splits no batch
    hp, _ = t.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "384", "TRAIN_SEQ_LEN": "64", "GRAD_ACCUM_STEPS": "3"})
    assert t.setup_device(hp).grad_accum_steps == 3  # any count that splits the batch
    hp, _ = t.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "384", "TRAIN_SEQ_LEN": "64", "GRAD_ACCUM_STEPS": "4"})
    with pytest.raises(t.ConfigError, match="= 256"):
        t.setup_device(hp)
    with pytest.raises(t.ConfigError, match="unknown variable GRAD_ACUM_STEPS: did you mean GRAD_ACCUM_STEPS"):
        t.Hyperparameters.from_env({"GRAD_ACUM_STEPS": "2"})


def test_evaluation_runs_on_a_world_size_that_does_not_divide_8(monkeypatch):
    t = study02()
    hp, _ = t.Hyperparameters.from_env({})
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(t.ConfigError, match="WORLD_SIZE=3: must divide 8"):
        t.setup_device(hp)
    monkeypatch.setattr(t.dist, "is_initialized", lambda: True)  # no process group in this test
    assert t.setup_device(hp, train=False).world_size == 3


def test_lr_schedule_warmdown_by_steps_and_by_wall_clock():
    t = study02()
    lr = lambda hp, s, ms: t.lr_schedule(hp, s, ms).lr  # noqa: E731
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "100", "WARMDOWN_ITERS": "20", "MAX_WALLCLOCK_SECONDS": "0"})
    assert [lr(hp, s, 0.0) for s in (0, 79, 80, 90, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    # 10 minutes minus a 30 s reserve; 100 ms steps: the last 20 steps (2 s) before the cap warm down
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "100000", "WARMDOWN_ITERS": "20",
                                        "MAX_WALLCLOCK_SECONDS": "600", "GPTQ_RESERVE_SECONDS": "30"})
    assert lr(hp, 1000, 100_000.0) == 1.0
    assert lr(hp, 5690, 569_000.0) == pytest.approx(0.5)
    assert lr(hp, 5700, 570_000.0) == 0.0
    assert t.lr_schedule(hp, 5690, 569_000.0).warmdown_by_steps == 1.0  # the clock's estimate, not the steps'
    # LR_WARMUP_STEPS (ours, off in published runs): step s (from 0) trains at (s + 1) / K, then the warmdown
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "100", "WARMDOWN_ITERS": "20", "MAX_WALLCLOCK_SECONDS": "0",
                                        "LR_WARMUP_STEPS": "4"})
    assert [lr(hp, s, 0.0) for s in (0, 1, 3, 50, 90)] == [0.25, 0.5, 1.0, 1.0, 0.5]
    assert [t.lr_schedule(hp, s, 0.0).warmdown for s in (0, 1, 3, 50, 90)] == [1.0, 1.0, 1.0, 1.0, 0.5]
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "10", "WARMDOWN_ITERS": "0", "LR_WARMUP_STEPS": "5"})
    assert [lr(hp, s, 0.0) for s in (0, 4, 9)] == [0.2, 1.0, 1.0]
