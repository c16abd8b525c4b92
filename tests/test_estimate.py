"""`deltatune estimate` against numbers computed by hand, and the article's GPT-3 figures."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from deltatune.estimate import estimate

# GPT-3 175B: hidden 12288, 96 blocks, 96 heads; batch 1 x 2048 tokens, 16-bit, checkpointing.
S, B, H, A, L = 2048, 1, 12288, 96, 96
PER_BLOCK = S * B * H * (34 + 5 * A * S / H)  # bytes, 16-bit
CHECKPOINTED = L * 2 * S * B * H + PER_BLOCK


def test_gpt3_full_finetuning_matches_the_article():
    e = estimate(175e9, "full")
    assert e.weights_gb == pytest.approx(350.0)
    assert e.gradients_gb == pytest.approx(350.0)
    assert e.optimizer_gb == pytest.approx(700.0)
    assert e.activations_gb == pytest.approx(CHECKPOINTED / 1e9)
    assert e.total_gb == pytest.approx(1400 + CHECKPOINTED / 1e9)  # the article's "1.4 TB"
    assert e.gpus == 18  # the article's "~18 A100-80GB"


def test_gpt3_lora_on_8bit_base_needs_three_gpus():
    e = estimate(175e9, "lora", quantize="int8", r=8)
    lora_params = L * 2 * 8 * 2 * H  # q and v, A [r, h] and B [h, r]
    assert e.trainable == lora_params
    expected = 175e9 * 1 + lora_params * (2 + 2 + 4) + CHECKPOINTED
    assert e.total_gb == pytest.approx(expected / 1e9)
    assert e.gpus == 3  # the article's "around 3 A100 GPUs"
    assert estimate(175e9, "lora").weights_gb == pytest.approx(350 + lora_params * 2 / 1e9)  # "350GB"
    assert estimate(175e9, "lora", quantize="nf4").weights_gb < 91  # "under 90 GB" for the weights at 4 bit


def test_fp32_without_checkpointing_and_adapter_counts():
    e = estimate(
        1e6, "houlsby", precision="32", checkpointing=False, batch=4, seq=16, hidden=64, layers=2, heads=4
    )
    b = 64 // 16
    assert e.trainable == 2 * 2 * (2 * 64 * b + 64 + b)
    per_block = 16 * 4 * 64 * (34 + 5 * 4 * 16 / 64) * 2  # fp32 doubles the 16-bit bytes
    assert e.activations_gb == pytest.approx(2 * per_block / 1e9)
    assert e.optimizer_gb == pytest.approx(e.trainable * 2 * 4 / 1e9)
    assert e.gpus == math.ceil(e.total_gb / 80) == 1


def test_bad_input():
    with pytest.raises(ValueError, match="can't stay quantized"):
        estimate(1e9, "full", quantize="nf4")
    with pytest.raises(ValueError, match="unknown method"):
        estimate(1e9, "prefix")


def test_command_line():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltatune",
            "estimate",
            "--params",
            "175e9",
            "--method",
            "lora",
            "--quantize",
            "int8",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.splitlines()[2].split()
    assert last[0] == "lora" and last[-1] == "3"


@pytest.mark.parametrize(
    "text, count",
    [("7b", 7e9), ("7B", 7e9), ("125m", 125e6), ("1.5t", 1.5e12), ("350K", 350e3), ("175e9", 175e9)],
)
def test_params_take_the_counts_people_write(text, count):
    from deltatune.estimate import param_count

    assert param_count(text) == pytest.approx(count)


@pytest.mark.parametrize("text", ["abc", "b", "", "7x", "7 billion"])
def test_params_that_are_not_counts_say_how_to_write_one(text, capsys):
    from deltatune import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["estimate", "--params", text])
    assert e.value.code == 2
    assert "is not a parameter count: write it as 7b, 125m, 1.3e9 or 175e9" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["7", "175", "1.3"])
def test_a_bare_small_number_is_refused_with_the_unit_it_lacks(text, capsys):
    """`--params 7` meant 7b, and printed a table of 0.0 GB for a 7-parameter model."""
    from deltatune import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["estimate", "--params", text])
    assert e.value.code == 2
    assert (
        f"'{text}' is {text} parameters, too few for a transformer; write the count with its unit, e.g. {text}b"
        in (capsys.readouterr().err)
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--r", "1000000000"],
            "--r 1000000000 is larger than the hidden size 4096: a LoRA update's rank is at most",
        ),
        (["--method", "all", "--r", str(10**23)], f"--r {10**23} is larger than the hidden size 4096"),
        (["--params", "1e30"], "--params 1e+30 is beyond any model"),
        (["--hidden", "7", "--heads", "3"], "--heads 3 doesn't divide the hidden size 7"),
        # a typo'd shape printed a table of 1e+29 GB
        (
            ["--hidden", "99999999999999", "--heads", "1"],
            "hidden 99999999999999 x 781249999999 blocks needs at least 1.56e+40 parameters",
        ),
        (
            ["--hidden", "16384", "--layers", "80"],
            "hidden 16384 x 80 blocks needs at least 4.29e+10 parameters",
        ),
        (["--batch", "0"], "--batch must be a positive number, got 0"),
        (["--batch", "-4"], "--batch must be a positive number, got -4"),
    ],
)
def test_absurd_sizes_are_refused_in_one_line(argv, message, capsys):
    """A rank of a billion (or of 23 digits) printed a table of 1e+28 parameters; --params 1e30 a table too."""
    from deltatune import cli

    with pytest.raises(SystemExit) as e:
        cli.main(
            ["estimate", "--params", "7b", *(["--method", "lora"] if "--method" not in argv else []), *argv]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"deltatune estimate: error: {message}" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # and --method full, which has no rank, still checks the rest
        cli.main(["estimate", "--params", "1e30", "--method", "full"])
    assert "beyond any model" in capsys.readouterr().err


# Each released model's parameter count as published: GGUF `general.parameter_count` / PyTorch's count of the
# weights, or the Hugging Face API's `safetensors.total` (Llama-2-70B: it adds 5,120 saved rotary buffers).
PUBLISHED_COUNTS = {
    "Llama-2-7B": 6_738_415_616,
    "Llama-2-13B": 13_015_864_320,
    "Llama-2-70B": 68_976_653_312,
    "Llama-3-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-3B": 3_085_938_688,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-14B": 14_770_033_664,
    "Qwen2.5-32B": 32_763_876_352,
    "Qwen2.5-72B": 72_706_203_648,
}


def test_each_released_shape_counts_the_parameters_its_model_has():
    """A wrong number in the table (a hidden size, a kv-head count, a vocabulary) moves the count off."""
    from deltatune.estimate import PUBLISHED

    assert [m.name for m in PUBLISHED] == list(PUBLISHED_COUNTS)
    for model in PUBLISHED:
        assert model.params == pytest.approx(PUBLISHED_COUNTS[model.name], rel=1e-6), model.name
        assert model.hidden % model.heads == 0 and model.heads % model.kv_heads == 0, model.name


@pytest.mark.parametrize(
    ("text", "name", "hidden", "layers", "heads"),
    [
        ("7b", "Llama-2-7B", 4096, 32, 32),
        ("13b", "Llama-2-13B", 5120, 40, 40),
        ("70b", "Llama-2-70B", 8192, 80, 64),
        ("8b", "Llama-3-8B", 4096, 32, 32),
        ("1b", "Llama-3.2-1B", 2048, 16, 32),
        ("3b", "Llama-3.2-3B", 3072, 28, 24),
        ("0.5b", "Qwen2.5-0.5B", 896, 24, 14),
        ("1.5B", "Qwen2.5-1.5B", 1536, 28, 12),
        ("14b", "Qwen2.5-14B", 5120, 48, 40),
        ("32b", "Qwen2.5-32B", 5120, 64, 40),
        ("72b", "Qwen2.5-72B", 8192, 80, 64),
        ("7000m", "Llama-2-7B", 4096, 32, 32),
        ("7.24b", "Mistral-7B-v0.1", 4096, 32, 32),  # no size of that name: the nearest count
        ("7.6b", "Qwen2.5-7B", 3584, 28, 28),
        ("6.9b", "Llama-2-7B", 4096, 32, 32),
        ("1.3e9", "Llama-3.2-1B", 2048, 16, 32),
        ("11.4b", "Llama-2-13B", 5120, 40, 40),  # 13.02e9 is 14.2% above
    ],
)
def test_a_size_takes_the_shape_of_the_released_model_of_that_size(text, name, hidden, layers, heads):
    """`--params 7b` assumed hidden 4224, 33 blocks, 33 heads, which no model has."""
    from deltatune.estimate import Shape, param_count

    shape = Shape.from_params(param_count(text))
    assert (shape.published.name, shape.hidden, shape.layers, shape.heads) == (name, hidden, layers, heads)
    assert shape.params == param_count(text)  # the count stays the one given


@pytest.mark.parametrize(
    ("params", "hidden", "layers", "heads"),
    [(175e9, 12288, 96, 96), (125e6, 1152, 9, 9), (20e9, 6016, 47, 47), (11.2e9, 4864, 38, 38)],
)
def test_a_size_no_released_model_is_near_keeps_the_aspect_ratio(params, hidden, layers, heads):
    """The shapes from before the table; 11.2e9: Llama-2-13B's 13.02e9 is 16% above it, Llama-3-8B's 8.03e9
    further below."""
    from deltatune.estimate import Shape

    shape = Shape.from_params(params)
    assert (shape.published, shape.hidden, shape.layers, shape.heads) == (None, hidden, layers, heads)


def test_a_shape_flag_turns_the_released_shapes_off():
    from deltatune.estimate import Shape

    assert Shape.from_params(7e9, heads=64) == Shape(7e9, 4224, 33, 64)
    assert Shape.from_params(7e9, layers=8) == Shape(7e9, 4224, 8, 33)
    assert Shape.from_params(7e9, hidden=2048) == Shape(7e9, 2048, 16, 16)
    assert estimate(7e9, "lora", hidden=64, layers=2, heads=4).trainable == 2 * 2 * 8 * 2 * 64


def test_the_estimate_and_its_header_use_the_released_shape(capsys):
    from deltatune import cli

    assert estimate(7e9, "lora").trainable == 32 * 2 * 8 * 2 * 4096  # Llama-2-7B's 32 blocks of 4096
    per_block = 2048 * 4096 * (34 + 5 * 32 * 2048 / 4096)
    assert estimate(7e9, "full").activations_gb == pytest.approx((32 * 2 * 2048 * 4096 + per_block) / 1e9)
    assert cli.main(["estimate", "--params", "7b", "--method", "lora"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(
        "7e+09 parameters (the shape of Llama-2-7B, which has 6.74e+09: hidden 4096, 32 blocks, 32 heads); "
    )
    assert cli.main(["estimate", "--params", "175e9", "--method", "lora"]) == 0
    assert capsys.readouterr().out.startswith("1.75e+11 parameters (hidden 12288, 96 blocks, 96 heads); ")


def test_the_json_says_which_shape_each_estimate_assumed(capsys):
    import json

    from deltatune import cli

    assert cli.main(["estimate", "--params", "8b", "--method", "lora", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["shape"] == {
        "hidden": 4096,
        "layers": 32,
        "heads": 32,
        "kv_hidden": 1024,  # Llama-3-8B: 8 key/value heads of 128
        "intermediate": 14336,
        "published_model": "Llama-3-8B",
    }
    assert row["trainable"] == 3_407_872  # q (4096 -> 4096) and v (4096 -> 1024), r=8, 32 blocks, as PEFT
    assert cli.main(["estimate", "--params", "175e9", "--method", "lora", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["shape"]["published_model"] is None and row["shape"]["hidden"] == 12288


def test_the_rank_check_applies_to_the_methods_whose_count_the_rank_changes():
    from deltatune.estimate import _uses_rank
    from deltatune.methods import registry

    ranked = {m for m in registry.names() if _uses_rank(m)}
    assert ranked == {"lora", "dora", "lora-plus", "qlora-nf4", "qlora-int8"}


@pytest.mark.parametrize(
    ("size", "method", "expected"),
    [
        # PEFT's print_trainable_parameters() for LoRA r=8 on q_proj/v_proj: the counts its users know
        ("7b", "lora", 4_194_304),  # Llama-2-7B: v as wide as q
        ("8b", "lora", 3_407_872),  # Llama-3-8B: v is 1024 wide (8 key/value heads)
        # DoRA adds a magnitude per output row of q (4096) and v (1024) in each of 32 blocks
        ("8b", "dora", 3_407_872 + 32 * (4096 + 1024)),
        # (IA)^3 scales k and v outputs (1024 each) and the down-projection's input (14336) per block
        ("8b", "ia3", 32 * (1024 + 1024 + 14336)),
        ("7b", "ia3", 32 * (4096 + 4096 + 11008)),
    ],
)
def test_trainable_counts_follow_the_released_shape_grouped_query_attention_included(size, method, expected):
    """With the released shapes, the formulas counted v's output as the full hidden size and the feed-forward as
    4h: Llama-3-8B's LoRA came out at 4,194,304 where PEFT counts 3,407,872."""
    from deltatune.estimate import Shape, param_count, trainable_params

    shape = Shape.from_params(param_count(size))
    assert trainable_params(shape, method, r=8) == expected
