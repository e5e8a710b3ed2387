"""Does RL visibly learn on the real model? PPO (ours) and GRPO (TRL) from one SFT checkpoint, against SFT on
held-out questions that no stage trains on, with confidence intervals.

    python bench/bench_rl_real.py --eval_dir PATH/TO/eval --sft_model demo_out/sft/ckpts/demo/checkpoint-4-40/tfmr
    python bench/bench_rl_real.py --eval_dir PATH/TO/eval                  # makes the SFT model first (+6 min)
    python bench/bench_rl_real.py --eval_dir PATH/TO/eval --quick --model tiny   # end to end in a few minutes

--eval_dir holds the benchmark files bench_eval_real.py reads (medqa.json, medmcqa.json, pubmedqa.json,
mmlu_pro_medical.json: JSON lists of MCQs); the data is not part of this repository. The steps:

  data   training problems in closed form (huatuo.problems: question with options, the correct option's
         text as the answer) from data/demo_data.json and a MedMCQA split (--medmcqa, default
         EVAL_DIR/medmcqa.json); held-out questions, --per_source from each of MedQA, PubMedQA, MMLU-Pro and the
         rest of MedMCQA, disjoint from every training question by text and by the 64-character rule
  sft    --sft_model, or SFT_stage1.py on data/demo_data.json from --model as the demo trains it
  arms   RL_stage2.py --algorithm ppo and --algorithm grpo from the SFT model, with the rule verifier
  eval   each model served by evaluation/launch_sglang_server.sh and asked through evaluation/eval.py
         (bench_eval_real.py's evaluate), its replies scored with the RL reward and by last-match accuracy

It prints and writes to --out_dir/report.md: per model the held-out format rate, mean reward and accuracy;
per arm the paired difference in mean reward against SFT with its 95% bootstrap interval over questions, the
training reward's fitted slope per update with its 95% interval, and the training KL and response length. The
targets, marked met or missed: some arm raises the held-out mean reward over SFT with the interval's lower end
above 0 while its format rate stays >= SFT's - 0.02; some arm's training reward slope has its interval above 0.
Plots: reward_curves.png (the training reward of both arms with their fitted lines) and <arm>_diagnostics.png.

Measured on this 2-core CPU, SFT model given (6 epochs, as made here; the demo's has 5), the defaults in one run:
52 minutes (PPO 15 updates of 16 episodes at 256 tokens 19, GRPO 30 steps 24, each model served uncompiled on 200
questions at 256 tokens about 3), both targets met; 6 more when the SFT model is made here; --arms picks one. A rerun
reuses an arm whose final policy is saved, and eval.py resumes the replies it has. The README has the measured results
of each setting tried.
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_eval_real import SOURCES, evaluate  # noqa: E402
from huatuo.checkpoints import checkpoint_dirs  # noqa: E402
from huatuo.items import MCQ, load_items  # noqa: E402
from huatuo.problems import closed_form_problems, heldout_set, split_by_question  # noqa: E402
from huatuo.report import (  # noqa: E402
    diagnostic,
    markdown_table,
    overall_accuracy,
    paired_gain,
    plot_diagnostics,
    plot_fitted,
    read_jsonl,
    reply_scores,
)
from huatuo.runner import join_command, run_logged  # noqa: E402
from huatuo.stats import slope  # noqa: E402
from huatuo.store import write_json_atomic  # noqa: E402

PYTHON = sys.executable
DEMO_DATA = ROOT / "data" / "demo_data.json"
ARMS = ("ppo", "grpo")
FORMAT_SLACK = 0.02
# vLLM compiles afresh for each new model folder: ready in 16 s uncompiled against 93 s, decoding at 0.74x the
# speed, which pays off only past some 150,000 tokens (bench/bench_vllm_compile.py); an eval writes at most 51,200.
UNCOMPILED = ("--optimization-level", "0")
# Responses per forward and backward pass: the logits of 8 x 768 tokens over a 49,152-token vocabulary already
# take 1.2 GB in fp32, and a PPO update with micro-batches of 8 went past this machine's 24 GB.
MICRO_BATCH = 4
# Sizes the full bench and --quick use where a flag is left unset.
SIZES = {
    "full": {
        "per_source": 50,
        "train_medmcqa": 500,
        "ppo_updates": 15,
        "grpo_updates": 30,
        "episodes_per_update": 16,
        "group_size": 8,
        "response_length": 256,
        "max_new_tokens": 256,
        "sft_epochs": 6,
    },
    "quick": {
        "per_source": 3,
        "train_medmcqa": 32,
        "ppo_updates": 2,
        "grpo_updates": 2,
        "episodes_per_update": 4,
        "group_size": 2,
        "response_length": 32,
        "max_new_tokens": 32,
        "sft_epochs": 1,
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--eval_dir", required=True, help="Folder with the benchmark JSON files.")
    data.add_argument(
        "--medmcqa", default=None, help="MedMCQA MCQs to split (default: EVAL_DIR/medmcqa.json)."
    )
    data.add_argument(
        "--per_source", type=int, default=None, help="Held-out questions per source (full: 50)."
    )
    data.add_argument(
        "--train_medmcqa", type=int, default=None, help="MedMCQA training problems used (full: 500)."
    )
    data.add_argument(
        "--seed", type=int, default=0, help="Seed of the splits, the training runs and the bootstrap."
    )

    models = parser.add_argument_group("models")
    models.add_argument("--sft_model", default=None, help="SFT checkpoint to start from (default: make one).")
    models.add_argument(
        "--model",
        default="real",
        help="Base model when the SFT model is made here: real (SmolLM2-135M-Instruct), tiny, or a folder.",
    )
    models.add_argument("--sft_epochs", type=int, default=None, help="SFT epochs when made here (full: 6).")

    rl = parser.add_argument_group("RL arms (RL_stage2.py)")
    rl.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="Algorithms to train.")
    # GRPO's per-token loss moves the policy far less per step than PPO's (KL 0.01 per token after 15 steps
    # at 1e-5, where PPO's had grown to 1-3 per response), so it takes a larger step.
    rl.add_argument("--ppo_learning_rate", type=float, default=1e-5, help="PPO's learning rate.")
    rl.add_argument("--grpo_learning_rate", type=float, default=5e-5, help="GRPO's learning rate.")
    rl.add_argument("--ppo_updates", type=int, default=None, help="PPO updates (full: 15).")
    rl.add_argument("--grpo_updates", type=int, default=None, help="GRPO steps, one update each (full: 30).")
    rl.add_argument("--episodes_per_update", type=int, default=None, help="Responses per update (full: 16).")
    rl.add_argument("--group_size", type=int, default=None, help="GRPO responses per prompt (full: 8).")
    rl.add_argument("--kl_coef", type=float, default=0.03, help="KL penalty (PPO) / beta (GRPO).")
    rl.add_argument(
        "--ppo_epochs", type=int, default=1, help="PPO passes over each rollout batch (GRPO makes one)."
    )
    rl.add_argument(
        "--grpo_importance_sampling",
        action="store_true",
        help="GRPO: keep TRL's weighting of each vLLM sample by trainer over engine probability (off by "
        "default: see train_arm).",
    )
    rl.add_argument("--temperature", type=float, default=0.7, help="Rollout sampling temperature.")
    rl.add_argument("--response_length", type=int, default=None, help="Tokens per rollout (full: 256).")
    rl.add_argument(
        "--rollout_backend",
        choices=("hf", "vllm"),
        default=None,
        help="Sampling engine of both arms (default: vLLM where installed, except for the tiny models).",
    )

    run = parser.add_argument_group("evaluation and output")
    run.add_argument(
        "--max_new_tokens", type=int, default=None, help="Tokens per held-out reply (full: 256)."
    )
    run.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="Eval requests in flight (vLLM batches them: more in flight, more tokens/s).",
    )
    run.add_argument(
        "--server",
        choices=("vllm", "transformers"),
        default=None,
        help="Server of the held-out eval (launch_sglang_server.sh --backend): vLLM where installed, else "
        "transformers serve (about 10x slower here); the tiny models always get transformers serve.",
    )
    run.add_argument("--out_dir", default="bench_out/rl_real", help="Where runs, replies and the report go.")
    run.add_argument(
        "--quick", action="store_true", help="A handful of questions, 2 updates, short responses."
    )
    run.add_argument("--quiet", action="store_true", help="Stage output only to the log files.")
    args = parser.parse_args(argv)
    for name, value in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # vLLM's CPU attention takes head sizes of 32 and up; the tiny models' is 16
    vllm = importlib.util.find_spec("vllm") is not None and args.model != "tiny"
    args.rollout_backend = args.rollout_backend or ("vllm" if vllm else "hf")
    args.server = args.server or ("vllm" if vllm else "transformers")
    if args.episodes_per_update % MICRO_BATCH or args.episodes_per_update % args.group_size:
        parser.error(f"--episodes_per_update must be a multiple of {MICRO_BATCH} and of --group_size")
    return args


class Bench:
    def __init__(self, args):
        self.args = args
        self.out_dir = Path(args.out_dir).resolve()
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            WANDB_MODE="offline",
            TOKENIZERS_PARALLELISM="false",
        )

    def run(self, cmd: list[str], stage: str) -> None:
        shown = join_command(cmd)
        print(f"$ {shown}", flush=True)
        run_logged(cmd, shown, self.out_dir / stage / "log.txt", ROOT, self.env, self.args.quiet)


def flags(**values) -> list[str]:
    """--name value pairs in the order given."""
    return [part for name, value in values.items() for part in (f"--{name}", str(value))]


# --------------------------------------------------------------------------------------------------- data
def build_data(args, out_dir: Path) -> tuple[Path, Path, dict]:
    eval_dir = Path(args.eval_dir)
    medmcqa_path = Path(args.medmcqa) if args.medmcqa else eval_dir / "medmcqa.json"
    # twice the held-out size is set aside, since some MedMCQA questions are near copies of training ones
    medmcqa_train, medmcqa_rest = split_by_question(
        load_items(medmcqa_path, MCQ), 2 * args.per_source, args.seed
    )
    demo = load_items(DEMO_DATA, MCQ)
    training = closed_form_problems(demo, "demo_data") + closed_form_problems(
        medmcqa_train[: args.train_medmcqa], "MedMCQA"
    )
    sources = {
        name: load_items(eval_dir / file, MCQ)
        for file, name in SOURCES.items()
        if file != "medmcqa.json" and (eval_dir / file).is_file()
    }
    sources["MedMCQA_validation"] = medmcqa_rest
    # the whole MedMCQA training split counts as training, not only the problems this run samples
    heldout, left_out = heldout_set(sources, args.per_source, demo + medmcqa_train, args.seed)
    train_path, heldout_path = out_dir / "train_problems.json", out_dir / "heldout.json"
    write_json_atomic(train_path, training)
    write_json_atomic(heldout_path, heldout)
    summary = {
        "training problems": len(training),
        "held-out questions": sum(len(items) for items in heldout.values()),
        "left out for overlap": left_out,
    }
    return train_path, heldout_path, summary


# --------------------------------------------------------------------------------------------------- models
def make_sft_model(bench: Bench) -> Path:
    args, out = bench.args, bench.out_dir / "sft"
    tiny = args.model == "tiny"
    if tiny:
        bench.run([PYTHON, "-m", "huatuo.tiny", *flags(out_dir=out / "models")], "sft")
        base = out / "models" / "policy"
    elif args.model == "real":
        bench.run([PYTHON, "-m", "huatuo.pretrained"], "sft")
        base = Path(os.environ.get("HUATUO_SMOLLM2_DIR") or ROOT / ".cache" / "SmolLM2-135M-Instruct")
    else:
        base = Path(args.model)
    # the demo's SFT settings (a random tiny model needs a far larger step)
    sft = flags(
        model_path=base,
        data_path=DEMO_DATA,
        output_dir=out / "ckpts",
        log_dir=out / "logs",
        experiment_name="bench",
        n_epochs=args.sft_epochs,
        train_bsz_per_gpu=2 if tiny else 4,
        gradient_accumulation_steps=1,
        learning_rate=3e-3 if tiny else 2e-4,
        warmup_rates=0.1,
        max_seq_len=1024,
        max_ckpts=1,
        report_to="none",
    )
    bench.run([PYTHON, "SFT_stage1.py", *sft, "--packing"], "sft")
    newest = max(checkpoint_dirs(out / "ckpts" / "bench"), key=lambda p: int(p.name.split("-")[-1]))
    return newest / "tfmr"


def train_arm(bench: Bench, algorithm: str, sft_model: Path, train_path: Path) -> Path:
    args = bench.args
    out = bench.out_dir / algorithm
    if (out / "model.safetensors").is_file():  # RL_stage2.py saves the final policy there when it is done
        print(f"{algorithm}: trained earlier, reusing {out} (delete it to train again)", flush=True)
        return out
    common = flags(
        algorithm=algorithm,
        model_name_or_path=sft_model,
        reward_model_path="rule",
        dataset_name=train_path,
        output_dir=out,
        response_length=args.response_length,
        temperature=args.temperature,
        total_episodes=getattr(args, f"{algorithm}_updates") * args.episodes_per_update,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=args.episodes_per_update // MICRO_BATCH,
        learning_rate=getattr(args, f"{algorithm}_learning_rate"),
        kl_coef=args.kl_coef,
        rollout_backend=args.rollout_backend,
        bf16=True,  # autocast: 2.2x faster forward and backward than fp32 on this CPU's AMX
        seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        eval_fraction=0,
        report_to="none",
    )
    if algorithm == "ppo":
        # the value model starts from the SFT checkpoint: it must read the policy's tokens
        extra = flags(
            value_model_path=sft_model,
            num_ppo_epochs=args.ppo_epochs,
            local_rollout_forward_batch_size=2 * MICRO_BATCH,
        )
    else:
        # One optimizer step per sampled batch (TRL's default num_iterations), so a step is an update. The engine
        # samples from the policy it was just given, so the two differ only in arithmetic, yet TRL's per-response
        # weights for that gap averaged 0.71-0.76 at the first step, before any update: each is a product over
        # some 220 tokens whose log-probabilities differ by 0.035 on average. Off, they cost no forward pass and
        # add no noise to the gradient.
        extra = flags(
            num_generations=args.group_size,
            num_ppo_epochs=1,
            logging_steps=1,
            vllm_importance_sampling_correction=args.grpo_importance_sampling,
        )
    bench.run([PYTHON, "RL_stage2.py", *common, *extra], algorithm)
    return out


# --------------------------------------------------------------------------------------------------- scoring
def training_summary(rows: list[dict]) -> dict:
    """Reward curve with its fitted slope, and the mean KL and response length, from a metrics.jsonl."""
    reward = diagnostic(rows, "reward")
    if reward is None:
        raise ValueError("the run logged no training reward")
    key, xs, ys = reward
    summary = {
        "reward_key": key,
        "x": xs,
        "reward": ys,
        "slope": slope(xs, ys) if len(set(xs)) >= 2 else None,
    }
    for name, label in (("kl", "KL to the reference"), ("response_length", "response length (tokens)")):
        found = diagnostic(rows, label)
        summary[name] = sum(found[2]) / len(found[2]) if found else math.nan
    return summary


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def main(args) -> int:
    bench = Bench(args)
    bench.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # ==========================================================================================
    # Load: training problems and held-out questions; the SFT model
    # ==========================================================================================
    train_path, heldout_path, data = build_data(args, bench.out_dir)
    print(f"data: {json.dumps(data)}")
    sft_model = Path(args.sft_model) if args.sft_model else make_sft_model(bench)

    # ==========================================================================================
    # Run: each arm from the SFT model, then every model on the held-out questions
    # ==========================================================================================
    models = {"sft": sft_model}
    for arm in args.arms:
        models[arm] = train_arm(bench, arm, sft_model, train_path)
    results = {}
    for label, model in models.items():
        sources, replies, seconds = evaluate(
            str(model),
            heldout_path,
            bench.out_dir / "eval" / label,
            args,
            server_flags=UNCOMPILED if args.server == "vllm" else (),
            backend=args.server,
        )
        scores = reply_scores(replies)["all"]
        results[label] = {
            "replies": replies,
            "items": scores["items"],
            "format_rate": scores["format_rate"],
            "correct_rate": scores["correct_rate"],
            "mean_reward": scores["mean_reward"],
            "accuracy": overall_accuracy({"sources": sources}),
            "seconds": seconds,
        }

    # ==========================================================================================
    # Save: the comparison with its intervals, the training curves, the targets
    # ==========================================================================================
    sft = results["sft"]
    rows, arms = [], {}
    for label, r in results.items():
        rows.append(
            [
                label,
                f"{r['format_rate']:.2f}",
                f"{r['correct_rate']:.2f}",
                f"{r['mean_reward']:.3f}",
                f"{r['accuracy']:.1%}",
            ]
        )
        if label == "sft":
            continue
        metrics = read_jsonl(models[label] / "metrics.jsonl")
        arms[label] = training_summary(metrics)
        arms[label]["gain"] = paired_gain(sft["replies"], r["replies"], seed=args.seed)
        plot_diagnostics(
            metrics, bench.out_dir / f"{label}_diagnostics.png", title=f"{label}: training diagnostics"
        )
    plot_fitted(
        {f"{arm} ({a['reward_key']})": (a["x"], a["reward"], a["slope"]) for arm, a in arms.items()},
        bench.out_dir / "reward_curves.png",
        "Training reward per update (PPO) / step (GRPO), with OLS fits",
        "update",
        "mean reward of the rollouts",
    )

    arm_rows = [
        [
            arm,
            a["gain"].text(),
            a["slope"].text(4) if a["slope"] else "n/a (one point)",
            len(a["x"]),
            f"{a['kl']:.4f}",
            f"{a['response_length']:.0f}",
        ]
        for arm, a in arms.items()
    ]
    gainers = [
        arm
        for arm, a in arms.items()
        if a["gain"].above_zero and results[arm]["format_rate"] >= sft["format_rate"] - FORMAT_SLACK
    ]
    climbers = [arm for arm, a in arms.items() if a["slope"] and a["slope"].above_zero]
    targets = [
        f"held-out mean reward above SFT's with the 95% interval's lower end > 0, format rate >= SFT - "
        f"{FORMAT_SLACK}: {verdict(bool(gainers))}" + (f" ({', '.join(gainers)})" if gainers else ""),
        f"training reward slope > 0 with its 95% interval above 0: {verdict(bool(climbers))}"
        + (f" ({', '.join(climbers)})" if climbers else ""),
    ]
    settings = "; ".join(
        f"{arm} {getattr(args, f'{arm}_updates')} updates at learning rate {getattr(args, f'{arm}_learning_rate')}"
        for arm in args.arms
    )
    report = (
        f"# RL against SFT on {sft['items']} held-out questions\n\n"
        f"SFT model: `{sft_model}`; {data['training problems']} training problems in closed form; {settings}; "
        f"{args.episodes_per_update} episodes per update, GRPO groups of {args.group_size}, {args.response_length}-"
        f"token rollouts, kl {args.kl_coef}; {args.max_new_tokens}-token greedy held-out replies. Held-out "
        f"questions left out for overlap with training: {data['left out for overlap']}.\n\n"
        + markdown_table(
            ["model", "format rate", "correct rate (rule)", "mean reward", "accuracy (last match)"], rows
        )
        + "\n\n"
        + markdown_table(
            [
                "arm",
                "held-out reward - SFT (paired bootstrap)",
                "training reward slope per update (t interval)",
                "logged points",
                "mean KL (PPO: summed over a response; GRPO: per token)",
                "mean response length",
            ],
            arm_rows,
        )  # fmt: skip
        + "\n\n"
        + "".join(f"- {line}\n" for line in targets)
        + f"\nWall time {time.perf_counter() - start:.0f} s. Plots: reward_curves.png, "
        + ", ".join(f"{arm}_diagnostics.png" for arm in arms)
        + ".\n"
    )
    (bench.out_dir / "report.md").write_text(report, encoding="utf-8")
    write_json_atomic(
        bench.out_dir / "results.json",
        {
            "data": data,
            "models": {k: str(v) for k, v in models.items()},
            "held_out": {k: {m: v for m, v in r.items() if m != "replies"} for k, r in results.items()},
            "arms": {
                arm: {
                    "gain": vars(a["gain"]),
                    "slope": vars(a["slope"]) if a["slope"] else None,
                    "kl": a["kl"],
                    "response_length": a["response_length"],
                }
                for arm, a in arms.items()
            },  # fmt: skip
            "targets": targets,
        },
    )
    print("\n" + report)
    print(f"report: {bench.out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
