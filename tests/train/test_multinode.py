"""Two "nodes" on localhost: the launcher run twice with NNODES=2, NODE_RANK=0/1, one process each, the way
a SLURM job starts one launcher per node. They must form one job of two ranks (a shared run folder, as
on a cluster file system), train like one process on the same global batch, keep identical parameters,
and write the adapter once: only global rank 0 writes, not each node's first process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from safetensors.torch import load_file
from train_helpers import FAST, ROOT, csv_losses, digits_recipe

from train.engine.loop import train

STEPS = 6
RUN = [f"train.max_steps={STEPS}", "adapters.default.dropout=0.0"]
CASES = {  # name -> (launcher, mode, summary "setup")
    "accelerate-ddp": ("launch_accelerate.sh", "ddp", "ddp"),
    "deepspeed-zero3": ("launch_deepspeed.sh", "zero3", "deepspeed-zero3"),
    "deepspeed-hostfile": ("launch_deepspeed.sh", "zero2", "deepspeed-zero2"),  # HOSTFILE + NODE_RANK, no NNODES
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return train(digits_recipe(tmp_path_factory.mktemp("single"), *RUN, "train.batch_size=32"))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_nodes_form_one_job_and_save_once(case, single_process, tmp_path):
    launcher, mode, setup = CASES[case]
    out_dir = tmp_path / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    nodes = []
    for rank in (0, 1):
        node_env = {**env, "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)}
        if case == "deepspeed-hostfile":  # DeepSpeed's own layout file; host names matter only to ssh
            (tmp_path / "hostfile").write_text("# two nodes, one process each\nnode-a slots=1\nnode-b slots=1\n")
            del node_env["NNODES"]
            node_env["HOSTFILE"] = str(tmp_path / "hostfile")
        command = ["bash", str(ROOT / "scripts" / launcher), str(ROOT / "configs/tiny/digits_lora.yaml"), "1",
                   mode, *FAST, *RUN, "train.batch_size=16", f"train.out_dir={out_dir}"]
        nodes.append(subprocess.Popen(command, cwd=tmp_path, env=node_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=900)[0])
        finally:
            node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{output[-5000:]}"

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["setup"] == setup and summary["step"] == STEPS
    assert summary["rank_disagreement"] == 0.0, "the two nodes' parameters differ"
    losses = csv_losses(out_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():  # each node's half of the batch, averaged across nodes
        assert loss == pytest.approx(single_process.losses[step], abs=1e-4), step

    final = out_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(out_dir.rglob("adapters*.safetensors")) == [out_dir / "adapters.safetensors",
                                                                final / "adapters.safetensors"]
    assert not [p for p in out_dir.rglob("*") if p.name.startswith((".tmp", ".trash"))]
    assert sorted(p.name for p in final.glob("rng-rank*.json")) == ["rng-rank0.json", "rng-rank1.json"]
    assert load_file(out_dir / "adapters.safetensors").keys() == load_file(
        single_process.out_dir / "adapters.safetensors").keys()
    assert "run folder" in outputs[0] and "run folder" not in outputs[1], "node 1 acted as the main process"
