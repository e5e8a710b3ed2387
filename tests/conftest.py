import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A one-process DeepSpeed ZeRO-3 accelerate config that runs on a CPU, for the stages' ZeRO-3 tests.
ZERO3_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
mixed_precision: 'no'
num_machines: 1
num_processes: 1
use_cpu: true
"""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of the tiny policy, value model and verifier, built once per test session."""
    from huatuo.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
