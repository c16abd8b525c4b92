"""`torchrun -m deltatune train` on CPU (gloo): both ranks end equal, and equal to one process with the
same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import classification_data, tiny_bert_folder, trainable_weights

from deltatune.train import load_train_config, run

# Runs the real command line under torchrun; after training, each rank also dumps its trainable weights.
LAUNCHER = """
import os, sys
from safetensors.torch import save_file
import deltatune.train.loop as T
from deltatune.cli import main

out, original = sys.argv[1], T.train

def train_and_dump(model, *args, **kwargs):
    summary = original(model, *args, **kwargs)
    weights = {}
    for name, p in getattr(model, "module", model).named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP: gather the shards
            weights[name] = full.detach().clone().contiguous()
    save_file(weights, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
    return summary

T.train = train_and_dump
sys.exit(main(["train", *sys.argv[2:]]))
"""


def torchrun(tmp_path, out, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    os.makedirs(out, exist_ok=True)
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", f"--nproc_per_node={nproc}", str(launcher), str(out), f"output_dir={out}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def common_args(tmp_path) -> list[str]:
    bert = tiny_bert_folder(tmp_path / "bert")
    data = classification_data(tmp_path / "emails.jsonl", n=23)  # 16 train (2 global batches), 7 eval
    return [
        f"model={bert}",
        f"data={data}",
        "eval_fraction=0.3",
        "max_steps=5",
        "lr=1e-2",
        "max_length=32",
        "method_args.r=2",
        "progress=false",
        "log_every=1",
        "save_every=0",
        "eval_batch_size=2",
    ]


def check_against_one_process(tmp_path, out, args):
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    single = tmp_path / "single"
    summary = run(load_train_config(None, [*args, "batch_size=8", "grad_accum=1", f"output_dir={single}"]))
    two = json.loads((out / "summary.json").read_text())
    assert two["world_size"] == 2 and two["global_batch"] == summary["global_batch"] == 8
    assert two["eval_accuracy"] == summary["eval_accuracy"]
    assert two["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-5)
    a, b = trainable_weights(single), trainable_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 5], "rank 0 alone logs"


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    args = common_args(tmp_path)
    out = tmp_path / "ddp"
    # 2 processes x batch 2 x accumulation 2 = global batch 8
    result = torchrun(tmp_path, out, [*args, "batch_size=2", "grad_accum=2", "strategy=ddp"])
    assert result.returncode == 0, result.stderr[-3000:]
    check_against_one_process(tmp_path, out, args)


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tmp_path):
    args = common_args(tmp_path)
    out = tmp_path / "fsdp"
    result = torchrun(tmp_path, out, [*args, "batch_size=2", "grad_accum=2", "strategy=fsdp"])
    assert result.returncode == 0, result.stderr[-3000:]
    check_against_one_process(tmp_path, out, args)


FAILING_RANK0 = """
import os, sys
import deltatune.checkpoint as C
from deltatune.cli import main

if os.environ["RANK"] == "0":  # rank 0 alone finds output_dir unwritable (the others never look)
    C.unwritable = lambda out: "rank 0 can't write there"
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_when_rank_0_cant_prepare_output_dir_every_rank_ends_with_one_line(tmp_path):
    """Rank 0 prepares output_dir alone between two barriers; when it failed, rank 1's barrier broke with gloo's
    'Connection closed by peer' and printed a traceback and 'this is a bug in deltatune' above rank 0's message."""
    launcher = tmp_path / "fail.py"
    launcher.write_text(FAILING_RANK0)
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    args = [*common_args(tmp_path), "batch_size=2", "strategy=ddp", f"output_dir={out}"]
    cmd += ["--standalone", "--nproc_per_node=2", str(launcher), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    err = result.stderr
    assert (
        f"deltatune train: error: output_dir {str(out)!r} can't be written in: rank 0 can't write there"
        in err
    )
    assert f"deltatune train: error: output_dir {str(out)!r} could not be prepared by rank 0" in err
    assert "this is a bug in deltatune" not in err and "Connection closed by peer" not in err, err[-3000:]
    assert not os.path.exists(out / "train_config.yaml")


def test_a_collective_broken_by_another_ranks_exit_is_one_line_not_a_bug(monkeypatch):
    """Wherever rank 0 stops with its own error, the ranks waiting for it in a collective get gloo's or NCCL's
    error: one line saying so, not a traceback and a bug report that bury rank 0's message."""
    from deltatune.cli import explain

    broken = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:48790")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    message, code = explain(broken)
    assert code == 1 and message.startswith("rank 1 stopped: another process of this distributed run ended")
    assert explain(RuntimeError("something else"))[0] is None  # other errors stay bugs
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert explain(broken)[0] is None  # outside a distributed run it is not about a peer
