"""Configuration from environment variables: typed, checked, loud about mistakes."""
import pytest

from conftest import study02


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


def test_a_likely_misspelling_is_warned_about():
    t = study02()
    _, warnings = t.Hyperparameters.from_env({"NUM_LAYER": "3", "HOME": "/root", "PATH": "/bin"})
    assert warnings == ["NUM_LAYER is not a known variable: did you mean NUM_LAYERS?"]


def test_batch_must_split_over_eight_micro_steps():
    t = study02()
    hp, _ = t.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "1000", "TRAIN_SEQ_LEN": "64"})
    with pytest.raises(t.ConfigError, match="TRAIN_BATCH_TOKENS=1000 must be a multiple of .* TRAIN_SEQ_LEN = 512"):
        t.setup_device(hp)
    hp, _ = t.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "384", "TRAIN_SEQ_LEN": "64", "GRAD_ACCUM_STEPS": "3"})
    assert t.setup_device(hp).grad_accum_steps == 3  # any count that splits the batch
    hp, _ = t.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "384", "TRAIN_SEQ_LEN": "64", "GRAD_ACCUM_STEPS": "4"})
    with pytest.raises(t.ConfigError, match="= 256"):
        t.setup_device(hp)
    with pytest.raises(t.ConfigError, match="RATIO_TARGET_START must exceed 1"):
        t.Hyperparameters.from_env({"RATIO_TARGET_STEPS": "100"})
    with pytest.raises(t.ConfigError, match="unknown variable GRAD_ACUM_STEPS: did you mean GRAD_ACCUM_STEPS"):
        t.Hyperparameters.from_env({"GRAD_ACUM_STEPS": "2"})


def test_lr_schedule_warmdown_by_steps_and_by_wall_clock():
    t = study02()
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "100", "WARMDOWN_ITERS": "20", "MAX_WALLCLOCK_SECONDS": "0"})
    assert [t.lr_multiplier(hp, s, 0.0) for s in (0, 79, 80, 90, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    # 10 minutes minus a 30 s reserve; 100 ms steps: the last 20 steps (2 s) before the cap warm down
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "100000", "WARMDOWN_ITERS": "20",
                                        "MAX_WALLCLOCK_SECONDS": "600", "GPTQ_RESERVE_SECONDS": "30"})
    assert t.lr_multiplier(hp, 1000, 100_000.0) == 1.0
    assert t.lr_multiplier(hp, 5690, 569_000.0) == pytest.approx(0.5)
    assert t.lr_multiplier(hp, 5700, 570_000.0) == 0.0
    # LR_WARMUP_STEPS (ours, off in published runs): step s (from 0) trains at (s + 1) / K, then the warmdown
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "100", "WARMDOWN_ITERS": "20", "MAX_WALLCLOCK_SECONDS": "0",
                                        "LR_WARMUP_STEPS": "4"})
    assert [t.lr_multiplier(hp, s, 0.0) for s in (0, 1, 3, 50, 90)] == [0.25, 0.5, 1.0, 1.0, 0.5]
    hp, _ = t.Hyperparameters.from_env({"ITERATIONS": "10", "WARMDOWN_ITERS": "0", "LR_WARMUP_STEPS": "5"})
    assert [t.lr_multiplier(hp, s, 0.0) for s in (0, 4, 9)] == [0.2, 1.0, 1.0]
