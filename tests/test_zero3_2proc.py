"""Every training stage under DeepSpeed ZeRO-3 with 2 CPU processes over gloo (configs/cpu_zero3_2proc.yaml), the
multi-process path of the paper's `accelerate launch --num_processes 8` commands, and SFT's saves under ZeRO-2.

Each launch runs in a process group of its own under a timeout; a launch that hangs is killed with its workers
and the test fails with the tail of its output. One launch feeds several tests through module-scoped fixtures.
RL runs go through PROBE, which records what each process did (rollout lengths, verifier calls, saves)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import SFT_stage1
from huatuo.checkpoints import state_dict_on_main
from huatuo.reward import ClassifierVerifier, RewardFunction
from huatuo.sft import latest_checkpoint, list_checkpoints
from tests.conftest import question

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cpu_zero3_2proc.yaml"
DEMO = ROOT / "data" / "demo_data.json"
QUESTION, ANSWER = "Open-ended Verifiable Question", "Ground-True Answer"
LAUNCH_TIMEOUT = 300  # seconds; a normal launch here takes under a minute
RESPONSE_LENGTH = 8

# The stage-2 script with every process recording, as JSON lines in $PROBE_DIR/rank<N>.jsonl: whether PPO's
# reference arrived as ZeRO-3 partitions (empty until gathered) and the verifier whole, its rollouts' response
# lengths and stops, each verifier call (inputs and P(correct)), each judgement, and every call that builds a state
# dict or writes a model or tokenizer folder. On rank 1 the PPO stop token is swapped for one the
# policy never writes, so that rank's responses all run to --response_length while rank 0's stop after a few
# tokens: the ranks then generate for different numbers of steps and judge different numbers of responses.
PROBE = """\
import json, os, sys
sys.path.insert(0, {root!r})
import accelerate, peft, transformers
import RL_stage2
from huatuo import reward

rank = int(os.environ["RANK"])
log_path = os.path.join(os.environ["PROBE_DIR"], f"rank{{rank}}.jsonl")


def record(event, **fields):
    with open(log_path, "a") as f:
        f.write(json.dumps({{"event": event, **fields}}) + "\\n")


def recorded(cls, name):
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        record(f"{{cls.__name__}}.{{name}}")
        return original(self, *args, **kwargs)

    setattr(cls, name, wrapper)


for cls, name in (
    (accelerate.Accelerator, "get_state_dict"),
    (transformers.PreTrainedModel, "save_pretrained"),
    (transformers.PreTrainedTokenizerBase, "save_pretrained"),
    (peft.PeftModel, "save_pretrained"),
):
    recorded(cls, name)

probabilities = reward.ClassifierVerifier.probabilities


def recorded_probabilities(self, responses, references):
    result = probabilities(self, responses, references)
    record("verifier", responses=list(responses), references=list(references), probabilities=result)
    return result


reward.ClassifierVerifier.probabilities = recorded_probabilities
judge = reward.RewardFunction.judge


def recorded_judge(self, responses, references):
    judgements = judge(self, responses, references)
    record("judge", responses=list(responses), references=list(references), judgements=judgements)
    return judgements


reward.RewardFunction.judge = recorded_judge


class ProbedTrainer(RL_stage2.PPOTrainer):
    def __init__(self, config, tokenizer, policy, ref_policy, value_model, reward_fn, *args, **kwargs):
        record(
            "loaded",
            reference_partitioned=None if ref_policy is None else all(p.numel() == 0 for p in ref_policy.parameters()),
            verifier_whole=all(p.numel() > 0 for p in reward_fn.verifier.model.parameters()),
        )
        super().__init__(config, tokenizer, policy, ref_policy, value_model, reward_fn, *args, **kwargs)
        if rank == 1:
            self.stop_token_ids = [self.tokenizer.bos_token_id]

    def _sample(self, prompts, temperature):
        rollout = super()._sample(prompts, temperature)
        record("rollout", lengths=rollout.response_mask.sum(1).tolist(), stopped=rollout.has_stop.tolist())
        return rollout


RL_stage2.PPOTrainer = ProbedTrainer
RL_stage2.main(RL_stage2.parse_args())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


def start(script, *args, cwd: Path, name: str, env=None, config=CONFIG) -> tuple[subprocess.Popen, Path]:
    """accelerate launch with the 2-process ZeRO-3 config, in a new process group, output to <cwd>/<name>.log."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(free_port()), str(script), *map(str, args),
    ]  # fmt: skip
    log = cwd / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    """Kill the launcher and its workers (kill -9 on the whole process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def launch(script, *args, cwd: Path, name: str, env=None, config=CONFIG) -> None:
    proc, log = start(script, *args, cwd=cwd, name=name, env=env, config=config)
    try:
        code = proc.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(
            f"{name}: no exit after {LAUNCH_TIMEOUT} s (hung?); its output ended with:\n{output_tail(log)}"
        )
    assert code == 0, f"{name} exited with {code}; its output ended with:\n{output_tail(log)}"


def probe_records(probe_dir: Path) -> dict[int, list[dict]]:
    return {
        rank: [json.loads(line) for line in (probe_dir / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }


def events(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["event"] == kind]


def logits_of(folder, ids) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits


def weights(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


# ------------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_data") / "sft.json"
    path.write_text(json.dumps(json.loads(DEMO.read_text())[:8]))
    return path


def sft_flags(tiny_models, data, out: Path, per_process_batch: int, *extra) -> list[str]:
    """8 examples, global batch 4, 2 epochs: 4 optimizer steps, a checkpoint after each."""
    return [
        "--model_path", str(tiny_models["policy"]), "--data_path", str(data), "--output_dir", str(out / "ckpts"),
        "--log_dir", str(out / "logs"), "--max_seq_len", "256", "--train_bsz_per_gpu", str(per_process_batch),
        "--gradient_accumulation_steps", "1", "--n_epochs", "2", "--learning_rate", "3e-3", "--report_to", "none",
        "--save_steps", "1", "--max_ckpts", "10", *extra,
    ]  # fmt: skip


def sft_metrics(out: Path) -> list[dict]:
    path = out / "logs" / "sft_stage1" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_2proc(tiny_models, sft_data, tmp_path_factory):
    """Batch 2 on each of the 2 processes, uninterrupted."""
    out = tmp_path_factory.mktemp("sft_2proc")
    launch(ROOT / "SFT_stage1.py", *sft_flags(tiny_models, sft_data, out, 2), cwd=out, name="sft")
    return out


@pytest.fixture(scope="module")
def sft_1proc(tiny_models, sft_data, tmp_path_factory):
    """The same run in this process, batch 4, in fp32 as the 2-process run (its config says mixed_precision no)."""
    out = tmp_path_factory.mktemp("sft_1proc")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        SFT_stage1.main(SFT_stage1.parse_args(sft_flags(tiny_models, sft_data, out, 4)))
    return out


def test_sft_loss_falls_and_tfmr_holds_the_model_one_process_trains(sft_2proc, sft_1proc, tiny_models):
    run = sft_2proc / "ckpts" / "sft_stage1"
    assert [p.name for p in list_checkpoints(run)] == [
        "checkpoint-0-1", "checkpoint-0-2", "checkpoint-1-3", "checkpoint-1-4",
    ]  # fmt: skip
    rows, single = sft_metrics(sft_2proc), sft_metrics(sft_1proc)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single], rel=1e-4)

    tfmr = run / "checkpoint-1-4" / "tfmr"
    trained, start = weights(tfmr), weights(tiny_models["policy"])
    assert trained.keys() == start.keys()
    assert all(trained[k].shape == v.shape for k, v in start.items())  # gathered, not partitions
    ids = torch.tensor([list(range(5, 69))])
    two = logits_of(tfmr, ids)
    one = logits_of(latest_checkpoint(sft_1proc / "ckpts" / "sft_stage1") / "tfmr", ids)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)
    assert (two - logits_of(tiny_models["policy"], ids)).abs().max() > 1e-2, "the weights never changed"


def test_sft_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_weights(
    sft_2proc, tiny_models, sft_data, tmp_path
):
    flags = sft_flags(tiny_models, sft_data, tmp_path, 2)
    run = tmp_path / "ckpts" / "sft_stage1"
    first = run / "checkpoint-0-1" / "trainer_state.json"  # written last: the checkpoint is complete
    proc, log = start(ROOT / "SFT_stage1.py", *flags, cwd=tmp_path, name="sft_killed")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    stop(proc)
    assert first.exists(), f"no first checkpoint before the kill; the output ended with:\n{output_tail(log)}"
    assert latest_checkpoint(run).name != "checkpoint-1-4", "the run finished before the kill"

    launch(ROOT / "SFT_stage1.py", *flags, "--resume", cwd=tmp_path, name="sft_resumed")
    expected = weights(sft_2proc / "ckpts" / "sft_stage1" / "checkpoint-1-4" / "tfmr")
    resumed = weights(run / "checkpoint-1-4" / "tfmr")
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    rows = sft_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in sft_metrics(sft_2proc)], rel=1e-5)


def test_sft_lora_tfmr_is_the_merged_adapter_of_the_one_process_run(tiny_models, sft_data, tmp_path):
    # no dropout: each process draws its own dropout masks, so with it no two layouts train alike
    lora = ("--lora_r", "8", "--lora_dropout", "0", "--learning_rate", "2e-2")
    launch(
        ROOT / "SFT_stage1.py", *sft_flags(tiny_models, sft_data, tmp_path / "two", 2, *lora),
        cwd=tmp_path, name="sft_lora",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        SFT_stage1.main(SFT_stage1.parse_args(sft_flags(tiny_models, sft_data, tmp_path / "one", 4, *lora)))
    final = latest_checkpoint(tmp_path / "two" / "ckpts" / "sft_stage1")
    assert final.name == "checkpoint-1-4"
    ids = torch.tensor([list(range(5, 69))])
    merged = logits_of(final / "tfmr", ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, final / "adapter")(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert (merged - logits_of(tiny_models["policy"], ids)).abs().max() > 1e-2, "the adapter learned nothing"
    one = latest_checkpoint(tmp_path / "one" / "ckpts" / "sft_stage1") / "tfmr"
    torch.testing.assert_close(merged, logits_of(one, ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Stage 2: PPO and GRPO with the classifier verifier
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """The warm policy's questions; 2 of the 20 are held out for evaluation."""
    items = [
        {QUESTION: question(i)[0]["content"], ANSWER: ("red", "blue", "dark red")[i % 3]} for i in range(20)
    ]
    path = tmp_path_factory.mktemp("problems") / "problems.json"
    path.write_text(json.dumps(items))
    return path


def rl_flags(warm_policy, tiny_models, problems, out: Path, *extra) -> list[str]:
    """2 prompts per process per update: 8 episodes are 2 updates of 4."""
    return [
        "--model_name_or_path", str(warm_policy), "--reward_model_path", str(tiny_models["verifier"]),
        "--dataset_name", str(problems), "--output_dir", str(out), "--response_length", str(RESPONSE_LENGTH),
        "--temperature", "1.0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--local_rollout_forward_batch_size", "2", "--num_ppo_epochs", "1", "--learning_rate", "1e-4",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def launch_probed(out: Path, flags: list[str], name: str) -> dict[int, list[dict]]:
    probe_dir = out.parent / f"{name}_probe"
    probe_dir.mkdir()
    probe = out.parent / "probe.py"
    probe.write_text(PROBE.format(root=str(ROOT)))
    launch(probe, *flags, cwd=out.parent, name=name, env={"PROBE_DIR": str(probe_dir)})
    return probe_records(probe_dir)


PPO_FLAGS = (
    "--total_episodes", "8", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "steps",
    "--eval_steps", "1", "--num_sample_generations", "-1",
)  # fmt: skip


@pytest.fixture(scope="module")
def ppo_2proc(warm_policy, tiny_models, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_2proc") / "run"
    flags = rl_flags(warm_policy, tiny_models, problems, out, *PPO_FLAGS)
    return out, flags, launch_probed(out, flags, "ppo")


@pytest.fixture(scope="module")
def verifier(tiny_models):
    return ClassifierVerifier(str(tiny_models["verifier"]), device="cpu")


def assert_verifier_matches_one_process(records, verifier, tiny_models):
    """Every verifier call of every process gives the P(correct) this process computes for the same inputs,
    and every judgement is the one the reward function gives here."""
    reward_fn = RewardFunction(str(tiny_models["verifier"]), device="cpu")
    for rank, rows in records.items():
        for call in events(rows, "verifier"):
            here = verifier.probabilities(call["responses"], call["references"])
            torch.testing.assert_close(
                torch.tensor(call["probabilities"]), torch.tensor(here), msg=f"rank {rank}"
            )
        for call in events(rows, "judge"):
            assert reward_fn.judge(call["responses"], call["references"]) == call["judgements"], (
                f"rank {rank}"
            )


def test_ppo_verifier_holds_full_weights_and_judges_as_one_process(ppo_2proc, verifier, tiny_models):
    out, _, records = ppo_2proc
    # the verifier is loaded whole; the models loaded after it are still created as partitions
    loaded = {"event": "loaded", "reference_partitioned": True, "verifier_whole": True}
    assert [events(rows, "loaded") for rows in records.values()] == [[loaded], [loaded]]
    assert_verifier_matches_one_process(records, verifier, tiny_models)
    # rank 0's responses are well formed, so its verifier ran (ZeRO-3 partitions would have failed right here)
    assert events(records[0], "verifier") and all(
        j is not None for c in events(records[0], "judge") for j in c["judgements"]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2]
    assert all(r["objective/format_rate"] >= 0.5 and r["objective/scores"] > 0 for r in rows)


def test_ppo_ranks_that_stop_early_and_late_do_not_hang(ppo_2proc):
    _, _, records = ppo_2proc
    early, late = events(records[0], "rollout"), events(records[1], "rollout")
    assert len(early) == len(late) == 4  # 2 updates, each a training rollout and an evaluation
    assert all(all(r["stopped"]) and max(r["lengths"]) < RESPONSE_LENGTH for r in early)
    assert all(not any(r["stopped"]) and min(r["lengths"]) == RESPONSE_LENGTH for r in late)


def test_ppo_checkpoints_are_written_by_rank_0_only(ppo_2proc):
    out, _, records = ppo_2proc
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saves = [r["event"] for r in records[0] if r["event"].endswith("save_pretrained")]
    assert saves and not [r for r in records[1] if r["event"].endswith("save_pretrained")]
    # under ZeRO-3 gathering the weights takes both processes, once per save
    gathers = [len(events(rows, "Accelerator.get_state_dict")) for rows in records.values()]
    assert gathers[0] == gathers[1] == 3  # checkpoint-1, checkpoint-2 and the final policy
    policy = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    assert policy.state_dict().keys() == AutoModelForCausalLM.from_pretrained(out).state_dict().keys()
    value = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint-2" / "value")
    assert value.config.num_labels == 1


def test_ppo_resume_from_a_checkpoint_is_exact(ppo_2proc, tmp_path):
    out, flags, records = ppo_2proc
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-2")
    flags = [str(resumed) if f == str(out) else f for f in flags]
    again = launch_probed(resumed, [*flags, "--resume_from_checkpoint", "latest"], "ppo_resumed")
    for rank in (0, 1):  # the second update samples and judges the same responses again
        assert events(again[rank], "judge") == events(records[rank], "judge")[2:]
    for folder in ("checkpoint-2", "checkpoint-2/value"):
        load = AutoModelForSequenceClassification if folder.endswith("value") else AutoModelForCausalLM
        expected = load.from_pretrained(out / folder).state_dict()
        got = load.from_pretrained(resumed / folder).state_dict()
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{folder} {key}")
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2]


def test_ppo_lora_saves_merged_models_from_rank_0(warm_policy, tiny_models, problems, verifier, tmp_path):
    out = tmp_path / "run"
    flags = rl_flags(
        warm_policy, tiny_models, problems, out, "--total_episodes", "4", "--save_strategy", "steps",
        "--save_steps", "1", "--eval_strategy", "no", "--lora_r", "4", "--learning_rate", "1e-3",
    )  # fmt: skip
    records = launch_probed(out, flags, "ppo_lora")
    assert_verifier_matches_one_process(records, verifier, tiny_models)
    assert not [r for r in records[1] if r["event"].endswith("save_pretrained")]
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template(
        question(0), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    for folder in (out, out / "checkpoint-1"):
        base = AutoModelForCausalLM.from_pretrained(warm_policy)
        with torch.no_grad():
            adapted = PeftModel.from_pretrained(base, folder / "adapter")(input_ids=ids).logits
        torch.testing.assert_close(logits_of(folder, ids), adapted, rtol=1e-5, atol=1e-5)
        assert (folder / "value" / "adapter" / "adapter_config.json").is_file()
    base_logits = logits_of(warm_policy, ids)
    assert (logits_of(out, ids) - base_logits).abs().max() > 1e-4, "the adapter learned nothing"


def test_grpo_judges_with_the_full_verifier_on_both_ranks(
    warm_policy, tiny_models, problems, verifier, tmp_path
):
    out = tmp_path / "run"
    flags = rl_flags(
        warm_policy, tiny_models, problems, out, "--algorithm", "grpo", "--num_generations", "4",
        "--total_episodes", "8", "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1",
    )  # fmt: skip
    records = launch_probed(out, flags, "grpo")
    assert_verifier_matches_one_process(records, verifier, tiny_models)
    assert all(events(rows, "verifier") for rows in records.values())  # each rank judged its own completions
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "rewards/medical_verifier/mean" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["format_rate"] > 0 for m in steps)
    assert weights(out).keys() == weights(warm_policy).keys()


# ------------------------------------------------------------------------------------------------
# Saves outside ZeRO-3 build the state dict on the main process only
# ------------------------------------------------------------------------------------------------
# SFT_stage1.py with each process appending a line to $PROBE_DIR/rank<N>.txt whenever it builds a state dict.
SFT_PROBE = """\
import os, sys
sys.path.insert(0, {root!r})
import accelerate
import SFT_stage1

get_state_dict = accelerate.Accelerator.get_state_dict


def recorded(self, *args, **kwargs):
    with open(os.path.join(os.environ["PROBE_DIR"], f"rank{{os.environ['RANK']}}.txt"), "a") as f:
        f.write("get_state_dict\\n")
    return get_state_dict(self, *args, **kwargs)


accelerate.Accelerator.get_state_dict = recorded
SFT_stage1.main(SFT_stage1.parse_args())
"""


def test_zero2_sft_builds_the_state_dict_on_rank_0_only(sft_1proc, tiny_models, sft_data, tmp_path):
    """Under ZeRO-2 accelerate clones every weight to the CPU to build a state dict; rank 1 must not, and tfmr/
    still holds the model one process trains."""
    config = tmp_path / "zero2.yaml"
    config.write_text(CONFIG.read_text().replace("zero_stage: 3", "zero_stage: 2"))
    probe, probe_dir = tmp_path / "probe.py", tmp_path / "probe"
    probe.write_text(SFT_PROBE.format(root=str(ROOT)))
    probe_dir.mkdir()
    flags = sft_flags(tiny_models, sft_data, tmp_path, 2)
    launch(probe, *flags, cwd=tmp_path, name="sft_zero2", env={"PROBE_DIR": str(probe_dir)}, config=config)
    assert sorted(p.name for p in probe_dir.iterdir()) == ["rank0.txt"]
    assert (probe_dir / "rank0.txt").read_text().split() == ["get_state_dict"] * 4  # one per checkpoint
    ids = torch.tensor([list(range(5, 69))])
    two = logits_of(latest_checkpoint(tmp_path / "ckpts" / "sft_stage1") / "tfmr", ids)
    one = logits_of(latest_checkpoint(sft_1proc / "ckpts" / "sft_stage1") / "tfmr", ids)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)


class CountingAccelerator:
    """What state_dict_on_main reads of an accelerator; get_state_dict counts its calls and, as under ZeRO-3,
    hands the weights to the main process only."""

    def __init__(self, distributed_type: str, stage: int, is_main_process: bool):
        self.distributed_type = distributed_type
        self.deepspeed_config = {"zero_optimization": {"stage": stage}}
        self.is_main_process = is_main_process
        self.state = {"weight": torch.zeros(1)}
        self.calls = 0

    def get_state_dict(self, model):
        self.calls += 1
        return self.state if self.is_main_process else None


@pytest.mark.parametrize(
    ("distributed_type", "stage", "calls_on_rank_1"),
    [("MULTI_GPU", 0, 0), ("DEEPSPEED", 2, 0), ("DEEPSPEED", 3, 1)],
    ids=["ddp", "zero2", "zero3"],
)
def test_only_zero3_builds_the_state_dict_on_every_process(distributed_type, stage, calls_on_rank_1):
    main, other = (CountingAccelerator(distributed_type, stage, rank == 0) for rank in (0, 1))
    assert state_dict_on_main(main, None) is main.state and main.calls == 1
    assert state_dict_on_main(other, None) is None and other.calls == calls_on_rank_1
