"""The shipped accelerate configs for bigger models (DeepSpeed ZeRO-2, ZeRO-3, FSDP), each run for a few steps of
stage 4 on the tiny Conan decoder in two CPU processes over gloo (their ``cpu_*_2proc.yaml`` variants): the run
finishes with the intended sharding, the final model loads, holds every weight at full shape (not the empty shards a
sharded model has in memory) and has moved away from the initial weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "conan_hf" / "stages" / "configs" / "accelerate"
STEPS = 3
#: Three AdamW steps at the tiny preset's learning rate (5e-4, the first step in warm-up at 0) move some weight by
#: ~5e-4 or more; float32 save/load is exact, so anything above 1e-5 is training, not noise.
MIN_MOVE = 1e-5



def _launch(config: str, output_dir: Path, model: Path, *extra: str, env: dict | None = None):
    """``accelerate launch --config_file CONFIG -m conan_hf.stages.supervised`` for STEPS steps, saving at the end."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    # DeepSpeed JIT-compiles a communication op on first use (~30 s); keep it across runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "-m", "conan_hf.stages.supervised", "--preset", "tiny", "--model", str(model),
           "--max_steps", str(STEPS), "--save_steps", str(STEPS), "--logging_steps", "1", "--resume", "no",
           "--disable_tqdm", "true", "--output_dir", str(output_dir), *extra]
    return subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _deepspeed_checkpoint(output_dir: Path) -> dict:
    """The DeepSpeed config and data-parallel size recorded in the run's last checkpoint."""
    folder = output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    states = torch.load(min(folder.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    return {"stage": states["ds_config"]["zero_optimization"]["stage"], "world": states["dp_world_size"],
            "files": sorted(p.name for p in folder.iterdir())}


def _check_final(final: Path, initial_dir: Path, trust_remote_code: bool = False) -> None:
    """The final model loads, every tensor has its unsharded shape and training moved the weights."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    saved, initial = load_file(final / "model.safetensors"), load_file(initial_dir / "model.safetensors")
    assert saved.keys() == initial.keys()
    shapes = {k: (tuple(saved[k].shape), tuple(initial[k].shape)) for k in initial}
    assert all(a == b for a, b in shapes.values()), {k: v for k, v in shapes.items() if v[0] != v[1]}
    moved = max((saved[k].float() - initial[k].float()).abs().max().item() for k in initial)
    assert moved > MIN_MOVE, f"the final weights equal the initial ones (max change {moved})"

    model = SentenceTransformer(str(final), device="cpu", trust_remote_code=trust_remote_code)
    embedding = model.encode(["a short test sentence"], convert_to_tensor=True)
    assert embedding.shape == (1, model.get_sentence_embedding_dimension())
    assert torch.isfinite(embedding).all()


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_processes(tiny_model_dir, tmp_path):
    result = _launch("cpu_deepspeed_zero2_2proc.yaml", tmp_path / "run", tiny_model_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = _deepspeed_checkpoint(tmp_path / "run")
    assert checkpoint["stage"] == 2 and checkpoint["world"] == 2
    for rank in (0, 1):  # optimizer states (and, in ZeRO-2, gradients) are partitioned over both ranks
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in checkpoint["files"]
    _check_final(tmp_path / "run" / "final", tiny_model_dir)


@pytest.mark.slow
def test_deepspeed_zero3_two_cpu_processes(tiny_model_dir, tmp_path):
    result = _launch("cpu_deepspeed_zero3_2proc.yaml", tmp_path / "run", tiny_model_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = _deepspeed_checkpoint(tmp_path / "run")
    assert checkpoint["stage"] == 3 and checkpoint["world"] == 2
    for rank in (0, 1):  # the parameters themselves are partitioned: one model-states file per rank
        assert f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in checkpoint["files"]
    # The checkpoint's model (Conan's own code) and the final stock export both hold the gathered, full weights.
    _check_final(tmp_path / "run" / f"checkpoint-{STEPS}", tiny_model_dir, trust_remote_code=True)
    _check_final(tmp_path / "run" / "final", tiny_model_dir)


FSDP_PROBE = """
from accelerate import Accelerator, PartialState
PartialState(cpu=True)  # a gloo process group over the launched processes (the most FSDP-friendly CPU state)
accelerator = Accelerator()  # reads the FSDP plugin from the environment accelerate launch set from the config
print("PROBE", accelerator.distributed_type, getattr(accelerator.state, "fsdp_plugin", None) is not None)
"""


def _fsdp_on_cpu(tmp_path: Path) -> tuple[bool, str]:
    """Whether accelerate turns FSDP on for two CPU processes launched with ``cpu_fsdp_2proc.yaml``."""
    probe = tmp_path / "fsdp_probe.py"
    probe.write_text(FSDP_PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_fsdp_2proc.yaml"),
           str(probe)]
    result = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("PROBE"))
    assert len(lines) == 2, result.stdout  # one line per launched process
    return all(line.endswith("True") for line in lines), lines[0]


@pytest.mark.slow
def test_fsdp_two_cpu_processes(tiny_model_dir, tmp_path):
    enabled, probe = _fsdp_on_cpu(tmp_path)
    if not enabled:
        pytest.skip(f"accelerate does not enable FSDP without an accelerator ({probe.removeprefix('PROBE ')}): "
                    "AcceleratorState keeps the FSDP plugin only for GPU-like distributed types, not MULTI_CPU/NO, "
                    "so a CPU run would silently train unsharded (torch's fully_shard itself works over gloo)")
    result = _launch("cpu_fsdp_2proc.yaml", tmp_path / "run", tiny_model_dir, env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS}"
    assert any(p.name.startswith(("pytorch_model_fsdp", "optimizer_0")) for p in checkpoint.iterdir())
    _check_final(tmp_path / "run" / "final", tiny_model_dir)
