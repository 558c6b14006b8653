"""The SLURM script and accelerate config of docs/multinode.md: the script is valid bash, and run with a
stand-in ``srun`` / ``scontrol`` / ``accelerate`` it builds, on node 1 of 2, the accelerate launch
command accelerate's own parser reads with every node's setting; the config parses with accelerate's
own loader as a multi-GPU, multi-node one."""
from __future__ import annotations

import os
import subprocess

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

from dfd_lib.core.paths import PROJECT_ROOT

SBATCH = PROJECT_ROOT / "scripts" / "slurm" / "dfd_multinode.sbatch"
CONFIG = PROJECT_ROOT / "scripts" / "slurm" / "accelerate_multinode.yaml"


def test_the_sbatch_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_accelerate_config_is_a_multi_node_multi_gpu_one():
    config = load_config_from_file(str(CONFIG))
    assert config.distributed_type == "MULTI_GPU" and not config.use_cpu
    assert config.num_machines == 2 and config.num_processes == 16 and config.machine_rank == 0
    assert config.main_process_ip and config.main_process_port == 29500 and config.rdzv_backend == "static"


def stand_ins(folder):
    """srun runs its command once (this node), scontrol names the nodes, accelerate prints its arguments."""
    folder.mkdir()
    scripts = {"srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
               "scontrol": 'printf "gpu-node-07\\ngpu-node-08\\n"\n',
               "accelerate": 'printf "%s\\n" "$@"\n'}
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/bash\n" + body)
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize("stage, entry", [("embed", ["-m", "dfd_lib.cli", "embed"]),
                                          ("predict", ["-m", "dfd_lib.cli", "predict"]),
                                          ("train", ["-m", "dfd_lib.training.cli"])])
def test_each_node_launches_its_share_with_the_jobs_settings(tmp_path, stage, entry):
    bin_dir = stand_ins(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_SUBMIT_DIR": str(PROJECT_ROOT),
           "ACCELERATE": str(bin_dir / "accelerate")}
    done = subprocess.run(["bash", str(SBATCH), stage, "--run-dir", "reports/a run"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[0] == "launch"
    args = launch_command_parser().parse_args(argv[1:])
    assert args.config_file == "scripts/slurm/accelerate_multinode.yaml"
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, 1)
    assert (args.main_process_ip, args.main_process_port) == ("gpu-node-07", 29500)
    assert args.module and ["-m", args.training_script, *args.training_script_args] == [*entry, "--run-dir", "reports/a run"]


def test_an_unknown_stage_is_refused(tmp_path):
    done = subprocess.run(["bash", str(SBATCH), "cluster"], capture_output=True, text=True,
                          env={**os.environ, "SLURM_SUBMIT_DIR": str(PROJECT_ROOT)}, timeout=60)
    assert done.returncode == 2 and "unknown stage cluster" in done.stderr
