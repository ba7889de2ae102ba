"""fastmlm.config: presets, validation messages, attention patterns, (de)serialisation."""
import dataclasses
import json

import pytest

from fastmlm.config import PRESETS, AttentionPattern, ModelConfig, parse_pattern, preset


def test_presets_validate_and_have_the_published_sizes():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.hidden_size % cfg.num_heads == 0, name
    base, large = preset("base"), preset("large")
    assert (base.num_layers, base.hidden_size, base.num_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert (large.num_layers, large.hidden_size, large.num_heads, large.intermediate_size) == (24, 1024, 16, 4096)
    assert base.vocab_size == 30522 and base.max_position_embeddings == 512


def test_preset_overrides_and_errors():
    cfg = preset("mini", vocab_size=8000, attention_backend="torch")
    assert (cfg.vocab_size, cfg.attention_backend, cfg.hidden_size) == (8000, "torch", 256)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match=r"unknown fields \['hiden_size'\]"):
        preset("tiny", hiden_size=64)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        preset("tiny", hidden_size=65)


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 0, "vocab_size must be a positive int"),
    ("num_layers", 2.5, "num_layers must be a positive int"),
    ("num_heads", True, "num_heads must be a positive int"),
    ("pad_token_id", 600, r"pad_token_id=600 must be a token id in \[0, vocab_size=512\)"),
    ("hidden_dropout", 1.0, r"hidden_dropout must be in \[0, 1\)"),
    ("attention_dropout", 0.1, "no dropout on the attention probabilities"),
    ("layer_norm_eps", 0.0, "layer_norm_eps must be > 0"),
    ("activation", "swish", "activation must be one of"),
    ("norm_position", "sandwich", "norm_position must be one of"),
    ("attention_backend", "flash", "attention_backend must be one of"),
    ("loss_backend", "cudnn", "loss_backend must be one of"),
    ("attention_pattern", (), "non-empty tuple"),
    ("attention_pattern", ("window:-1",), "cannot parse attention pattern 'window:-1'"),
    ("attention_pattern", ("dense", "sparse"), "cannot parse attention pattern 'sparse'"),
    ("attention_pattern", ("window:4+window:8",), "names a window twice"),
    ("attention_pattern", ("global:0",), "G >= 1"),
    ("block_size", 0, "block_size must be a positive int"),
])
def test_validation_names_the_wrong_field(field, value, message):
    cfg = dataclasses.replace(preset("tiny"), **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_parse_pattern():
    assert parse_pattern("dense") == AttentionPattern() and parse_pattern("dense").dense
    assert parse_pattern("window:128") == AttentionPattern(window=128)
    assert parse_pattern("global:2") == AttentionPattern(num_global=2)
    assert parse_pattern("window:0+global:1") == AttentionPattern(window=0, num_global=1)
    assert parse_pattern("global:3 + window:5") == AttentionPattern(window=5, num_global=3)
    assert not parse_pattern("window:0").dense


def test_patterns_repeat_over_layers_modernbert_style():
    cfg = preset("modern-small")
    patterns = cfg.layer_patterns()
    assert len(patterns) == cfg.num_layers == 6
    assert [p.dense for p in patterns] == [True, False, False, True, False, False]
    assert all(p.window == 64 for p in patterns if not p.dense)
    odd = preset("tiny", num_layers=5, attention_pattern=("window:8", "dense")).layer_patterns()
    assert [p.window for p in odd] == [8, -1, 8, -1, 8]
    assert preset("tiny", attention_pattern="window:3").attention_pattern == ("window:3",)


def test_dict_round_trip_through_json():
    cfg = preset("modern-small", vocab_size=1234, hidden_dropout=0.0)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match=r"unknown fields \['num_hidden_layers'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "num_hidden_layers": 3})


# --------------------------------------------------------------------------- TrainConfig (issue 17)
def test_every_train_field_carries_its_help_and_choices():
    from fastmlm.config import TRAIN_PRESETS, TrainConfig, train_preset

    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name
        for choice in f.metadata.get("choices", ()):
            assert isinstance(choice, str), f.name
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}
    assert choices["schedule"] == ("linear", "cosine") and "mini" in choices["model"]
    for name in TRAIN_PRESETS:
        cfg = train_preset(name)
        for f in dataclasses.fields(TrainConfig):
            if f.metadata.get("choices"):
                assert getattr(cfg, f.name) in f.metadata["choices"], (name, f.name)


@pytest.mark.parametrize("field,value,message", [
    ("valid_holdout", 1.0, r"valid_holdout must lie in \[0, 1\)"),
    ("valid_holdout", -0.1, r"valid_holdout must lie in \[0, 1\)"),
    ("made_by", "someone", "made_by must be one of"),
    # refused by the config, naming the field, before --overwrite clears a run folder (torch's AdamW
    # and the tokenizer trainer said "Invalid beta parameter at index 0" ... only after that)
    ("betas", (1.5, 0.9), r"betas must be two numbers in \[0, 1\)"),
    ("betas", (float("nan"), 0.9), r"betas must be two numbers in \[0, 1\)"),
    ("eps", -1.0, "eps must be a finite number > 0"),
    ("eps", float("nan"), "eps must be a finite number > 0"),
    ("vocab_size", 50, "vocab_size must be at least 105"),
    ("keep_checkpoints", 0, "keep_checkpoints must be a positive int"),  # silently kept them all
    ("eval_batches", 0, "eval_batches must be None"),  # "the validation data ... holds no text"
    ("eval_batches", -3, "eval_batches must be None"),  # "Indices for islice() must be None or an integer"
    ("out_dir", "", r"out_dir \(--out-dir\) must name the run folder"),  # ran in the current folder
])
def test_train_config_refuses_bad_new_fields(field, value, message):
    from fastmlm.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).validate()


def test_demo_presets_train_apart_from_plain_train_runs():
    from fastmlm.config import RESUMABLE, TrainConfig, train_preset

    assert TrainConfig().out_dir == "runs/train" and train_preset("demo").out_dir == "runs/train"
    assert train_preset("demo").made_by == "train"  # `fastmlm demo` marks its own runs
    assert train_preset("demo-gpu").model_overrides["norm_position"] in ("pre", "post")
    assert "compile" in RESUMABLE
