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
            "--r 1000000000 is larger than the hidden size 4224: a LoRA update's rank is at most",
        ),
        (["--method", "all", "--r", str(10**23)], f"--r {10**23} is larger than the hidden size 4224"),
        (["--params", "1e30"], "--params 1e+30 is beyond any model"),
        (["--hidden", "7", "--heads", "3"], "--heads 3 doesn't divide the hidden size 7"),
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
