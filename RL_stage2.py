"""Stage 2: reinforcement learning on verifiable medical problems with a verifier reward.

PPO (the paper's method) runs on our own trainer (huatuo/ppo_trainer.py; the arithmetic is in huatuo/ppo.py);
--algorithm grpo|rloo runs TRL's maintained trainers with the same reward and data (huatuo/rl_trl.py).
The reward (huatuo/reward.py) is 1.0 for a well-formed response ("## Thinking" once, then "## Final Response"
once) that the verifier judges correct, 0.1 for a well-formed wrong one, 0 otherwise. --reward_model_path picks
the verifier: a 2-label classifier folder or hub id (medical_o1_verifier_3B), `rule` (normalised answer match),
or `llm:<base_url>` (an OpenAI-compatible judge; key from OPENAI_API_KEY).

The paper's 8B run, one node of 8 GPUs (--dataset_name also takes a local JSON/JSONL of problems):

    accelerate launch --num_processes 8 --num_machines 1 --machine_rank 0 \\
        --config_file configs/deepspeed_zero3.yaml --deepspeed_multinode_launcher standard RL_stage2.py \\
        --model_name_or_path FreedomIntelligence/HuatuoGPT-o1-8B \\
        --reward_model_path FreedomIntelligence/medical_o1_verifier_3B \\
        --value_model_path meta-llama/Llama-3.2-3B-Instruct \\
        --dataset_name FreedomIntelligence/medical-o1-verifiable-problem \\
        --response_length 1300 --temperature 0.5 --local_rollout_forward_batch_size 8 \\
        --num_ppo_epochs 3 --num_mini_batches 1 --total_episodes 20000 \\
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --bf16 True \\
        --output_dir ./ckpts --save_strategy steps --save_step 20 --save_total_limit 1 \\
        --eval_strategy steps --eval_steps 20 --kl_coef 0.03 --learning_rate 5e-7 --warmup_ratio 0.05 \\
        --gradient_checkpointing True --dataloader_num_workers 4 --run_name ppo_medical_o1_8B \\
        --num_sample_generations -1 --report_to wandb

A minute on a CPU with the tiny offline models and the rule verifier:

    python -m huatuo.tiny --out_dir tiny_models
    python RL_stage2.py --model_name_or_path tiny_models/policy --value_model_path tiny_models/value \\
        --reward_model_path rule --dataset_name data/demo_data.json --output_dir runs/ppo_tiny \\
        --response_length 24 --total_episodes 32 --per_device_train_batch_size 2 \\
        --gradient_accumulation_steps 2 --local_rollout_forward_batch_size 4 --learning_rate 1e-5 \\
        --save_strategy steps --save_steps 4 --eval_strategy steps --eval_steps 4 --report_to none

LoRA (--lora_r R, any --algorithm): the policy trains an adapter on frozen weights; for PPO the reference is the
policy with its adapter switched off (one model copy fewer) and the value model gets an adapter of its own
(--no_lora_value_model trains it in full). An 8B policy with a 3B value model on two GPUs (ZeRO-3 with CPU offload,
configs/deepspeed_zero3_offload.yaml; LoRA wants a larger learning rate than full training). Sampling gathers the
whole 8B policy on each GPU (16 GB in bf16) and every process holds a whole verifier (6 GB for the 3B), so on 24 GB
GPUs add --ds3_gather_for_generation False and --reward_device cpu (or an llm: judge elsewhere); not run on
hardware here:

    accelerate launch --num_processes 2 --config_file configs/deepspeed_zero3_offload.yaml RL_stage2.py \\
        --model_name_or_path ckpts/sft_stage1/checkpoint-2-468/tfmr \\
        --value_model_path meta-llama/Llama-3.2-3B-Instruct \\
        --reward_model_path FreedomIntelligence/medical_o1_verifier_3B \\
        --dataset_name data/medical_o1_verifiable_problem.json --lora_r 16 --learning_rate 2e-5 \\
        --response_length 1300 --local_rollout_forward_batch_size 4 --per_device_train_batch_size 1 \\
        --gradient_accumulation_steps 16 --bf16 True --gradient_checkpointing True --output_dir ckpts/ppo_lora
    # GRPO with the Dr. GRPO length-unbiased loss, same LoRA settings
    ... RL_stage2.py --algorithm grpo --loss_type dr_grpo --lora_r 16 ...

Resume an interrupted run with --resume_from_checkpoint latest (or a checkpoint-N path). Batch sizes:
each update rolls out per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches
prompts per process; updates = ceil(total_episodes / (that x processes)). There is no constraint tying
--local_rollout_forward_batch_size to the number of processes, nor --num_mini_batches to
--per_device_train_batch_size: the script checks the relations that do matter before loading a model.
Outputs in --output_dir: checkpoint-<update>/ (policy with tokenizer, value/, state/), the final policy at
the top, metrics.jsonl (one line per update; eval/ keys every --eval_steps), samples/, run_args.json. With
--lora_r every policy and value folder holds the merged model (servable) and the adapter alone in adapter/.
"""

import argparse
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    set_seed,
)

from huatuo.checkpoints import find_checkpoint
from huatuo.items import ANSWER, QUESTION, InputError, read_json
from huatuo.lora import LoraArguments, check_lora_arguments, lora_config
from huatuo.models import attn_implementation, ensure_chat_template, ensure_pad_token, load_records
from huatuo.ppo import PPOConfig, config_for_saving, plan_for
from huatuo.ppo_trainer import PPOTrainer
from huatuo.reward import RewardFunction
from huatuo.store import save_args


@dataclass
class ScriptArguments:
    _argument_group_name = "data and algorithm"

    dataset_name: str = field(
        default="FreedomIntelligence/medical-o1-verifiable-problem",
        metadata={
            "help": "Verifiable problems: a local .json/.jsonl/.parquet, a save_to_disk folder, or a hub id."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_split: str = field(default="train", metadata={"help": "Hub dataset split."})
    max_prompt_length: int = field(
        default=1000, metadata={"help": "Problems whose chat prompt is longer (in tokens) are dropped."}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of problems held out for evaluation."})
    max_eval_samples: int = field(default=200, metadata={"help": "Cap on the held-out split."})
    algorithm: str = field(
        default="ppo", metadata={"help": "ppo (our trainer), grpo or rloo (TRL's trainers)."}
    )
    num_generations: int = field(
        default=4, metadata={"help": "GRPO/RLOO only: responses sampled per prompt."}
    )
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "GRPO only: TRL's loss aggregation, passed through: grpo, dr_grpo (Dr. GRPO, length-unbiased), "
            "dapo, bnpo, cispo, sapo, luspo, vespo. Default: TRL's (dapo)."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={
            "help": "GRPO/RLOO with --rollout_backend vllm: weigh each response by the trainer's probability of it "
            "over vLLM's (TRL's correction, sequence-level, dropping weights above 3). False trains on vLLM's "
            "samples as they are, as PPO does, and saves a forward pass per batch."
        },
    )


@dataclass
class ModelArguments:
    _argument_group_name = "models and reward"

    model_name_or_path: str = field(
        default="FreedomIntelligence/HuatuoGPT-o1-8B",
        metadata={"help": "Policy to train (also the frozen reference)."},
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Value model: loaded as a 1-label sequence classifier; must share the policy's tokenizer. "
            "Default: the policy's weights."
        },
    )
    reward_model_path: str = field(
        default="FreedomIntelligence/medical_o1_verifier_3B",
        metadata={"help": "Verifier: a 2-label classifier folder or hub id, 'rule', or 'llm:<base_url>'."},
    )
    correct_reward: float = field(default=1.0, metadata={"help": "Reward of a well-formed correct response."})
    wrong_reward: float = field(default=0.1, metadata={"help": "Reward of a well-formed wrong response."})
    malformed_reward: float = field(default=0.0, metadata={"help": "Reward when the format check fails."})
    reward_threshold: float = field(
        default=0.4, metadata={"help": "Classifier verifier: P(correct) above this."}
    )
    reward_batch_size: int = field(default=8, metadata={"help": "Classifier verifier batch size."})
    reward_max_length: int = field(
        default=4000, metadata={"help": "Classifier verifier input cap in tokens."}
    )
    reward_device: str | None = field(
        default=None,
        metadata={
            "help": "Device of the classifier verifier (each process holds a whole copy): default the process's "
            "own; `cpu`, or a spare GPU such as cuda:7, keeps it off the training GPUs."
        },
    )
    llm_judge_model: str = field(
        default="gpt-4o", metadata={"help": "Model name for --reward_model_path llm:<url>."}
    )
    structured_output: bool = field(
        default=True,
        metadata={
            "help": "--reward_model_path llm:<url>: ask the judge for its verdict as a json_schema response_format; "
            "--no_structured_output leaves it out, for servers that refuse it (the plain True/False is read)."
        },
    )
    lora_value_model: bool = field(
        default=True,
        metadata={
            "help": "PPO with --lora_r: give the value model a LoRA adapter of its own (its score head trains in "
            "full); --no_lora_value_model trains the whole value model."
        },
    )


def parse_args(argv=None):
    parser = HfArgumentParser(
        (ScriptArguments, ModelArguments, LoraArguments, PPOConfig),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    script_args, model_args, lora_args, config = parser.parse_args_into_dataclasses(args=argv)
    if script_args.algorithm not in ("ppo", "grpo", "rloo"):
        parser.error(f"--algorithm must be ppo, grpo or rloo, got {script_args.algorithm!r}")
    if not 0 <= script_args.eval_fraction < 1:
        parser.error(f"--eval_fraction must be in [0, 1), got {script_args.eval_fraction}")
    if not script_args.vllm_importance_sampling_correction and script_args.algorithm == "ppo":
        parser.error(
            "--vllm_importance_sampling_correction applies to grpo and rloo; PPO has no such weights"
        )
    if script_args.loss_type is not None and script_args.algorithm != "grpo":
        parser.error(
            f"--loss_type selects a GRPO loss; it does not apply to --algorithm {script_args.algorithm}"
        )
    try:
        check_lora_arguments(lora_args)
    except ValueError as err:
        parser.error(str(err))
    return script_args, model_args, lora_args, config


def load_problems(script_args, seed: int) -> tuple[list[dict], list[dict], int]:
    """(train, eval, dropped): problems with both open-ended keys non-empty, shuffled, eval = min(10%, 200)."""
    path = script_args.dataset_name
    if Path(path).suffix == ".json" and Path(path).is_file():
        # plain JSON is read as it is, so a wrongly typed field is reported by item before Arrow fails on it
        rows = read_json(path)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise InputError(f"{path}: expected a JSON list of objects")
    else:
        split = script_args.dataset_split
        rows = load_records(path, script_args.dataset_config, split, columns=[QUESTION, ANSWER])
    problems, dropped = [], 0
    for index, row in enumerate(rows):
        row = {key: row.get(key) for key in (QUESTION, ANSWER)}
        for key in (QUESTION, ANSWER):
            if row[key] is not None and not isinstance(row[key], str):
                raise InputError(
                    f"{path}: item {index}, key {key!r} must be a string, got {type(row[key]).__name__}"
                )
        question, answer = (row[QUESTION] or "").strip(), (row[ANSWER] or "").strip()
        if question and answer:
            problems.append({"question": question, "reference": answer, "index": index})
        else:
            dropped += 1
    if not problems:
        raise InputError(f"{path}: no item has both {QUESTION!r} and {ANSWER!r} non-empty")
    random.Random(seed).shuffle(problems)
    n_eval = min(script_args.max_eval_samples, math.floor(len(problems) * script_args.eval_fraction))
    if script_args.eval_fraction > 0 and n_eval == 0 and len(problems) > 1:
        n_eval = 1
    return problems[n_eval:], problems[:n_eval], dropped


def tokenize_prompts(problems: list[dict], tokenizer, max_prompt_length: int) -> tuple[list[dict], int]:
    """Chat-template each question with the generation prompt; drop the ones over max_prompt_length."""
    kept, too_long = [], 0
    for problem in problems:
        messages = [{"role": "user", "content": problem["question"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        kept.append({**problem, "input_ids": ids, "prompt": messages})
    return kept, too_long


def check_same_tokenizer(tokenizer, value_model_path: str) -> None:
    """The value model reads the policy's token ids, so its vocabulary must agree with the policy's."""
    other = AutoTokenizer.from_pretrained(value_model_path)
    probe = "A 45-year-old man has chest pain. 患者胸痛。## Final Response"
    if tokenizer(probe)["input_ids"] != other(probe)["input_ids"]:
        raise ValueError(
            f"--value_model_path {value_model_path} tokenizes differently from --model_name_or_path; "
            "use a value model from the same family (e.g. Llama-3.2-3B-Instruct for a Llama-3.1 policy)"
        )


def main(args):
    """Train; returns the trainer (ours for PPO, TRL's for GRPO/RLOO) with the final model saved."""
    script_args, model_args, lora_args, config = args
    from accelerate import PartialState

    state = PartialState()
    set_seed(config.seed)
    if "wandb" in (config.report_to or []):
        os.environ.setdefault("WANDB_MODE", "offline")
    output_dir = Path(config.output_dir)
    value_path = model_args.value_model_path or model_args.model_name_or_path

    # ==============================================================================
    # Load: data, tokenizer, batch plan (checked before any model is loaded)
    # ==============================================================================
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    train_problems, eval_problems, dropped = load_problems(script_args, config.seed)
    train_set, long_train = tokenize_prompts(train_problems, tokenizer, script_args.max_prompt_length)
    eval_set, long_eval = tokenize_prompts(eval_problems, tokenizer, script_args.max_prompt_length)
    state.print(
        f"{script_args.dataset_name}: {len(train_set)} train / {len(eval_set)} eval problems; dropped {dropped} "
        f"with an empty field and {long_train + long_eval} over {script_args.max_prompt_length} prompt tokens"
    )
    if not train_set:
        raise InputError(f"{script_args.dataset_name}: no training problem left after filtering")
    if script_args.algorithm == "ppo":
        plan_for(config, len(train_set), state.num_processes)
    else:
        from huatuo.rl_trl import check_trl_batch

        trl_args = argparse.Namespace(
            **{**vars(config), **vars(model_args), **vars(lora_args), **vars(script_args)}
        )
        # TRL's reward function reads the "reference" column, which Trainer's default would strip
        trl_args.remove_unused_columns = False
        check_trl_batch(script_args.algorithm, trl_args, state.num_processes)
    run_args = {**vars(script_args), **vars(model_args), **vars(lora_args), **config_for_saving(config)}
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_args(output_dir / "run_args.json", run_args, secret_keys=("hub_token", "api_key"))

    reward_fn = RewardFunction(
        model_args.reward_model_path,
        correct_reward=model_args.correct_reward,
        wrong_reward=model_args.wrong_reward,
        malformed_reward=model_args.malformed_reward,
        threshold=model_args.reward_threshold,
        device=model_args.reward_device or state.device,
        batch_size=model_args.reward_batch_size,
        max_length=model_args.reward_max_length,
        llm_model=model_args.llm_judge_model,
        structured_output=model_args.structured_output,
    )

    if script_args.algorithm in ("grpo", "rloo"):
        from datasets import Dataset

        from huatuo.rl_trl import train_with_trl

        def to_trl(rows):
            return Dataset.from_list([{"prompt": r["prompt"], "reference": r["reference"]} for r in rows])

        trainer = train_with_trl(
            script_args.algorithm, trl_args, to_trl(train_set), to_trl(eval_set), reward_fn
        )
        state.print(f"final model: {output_dir}")
        return trainer

    # Under `accelerate launch` with a ZeRO-3 config, parsing PPOConfig (a TrainingArguments) built a DeepSpeed
    # plugin from the launcher's environment and registered its config with transformers for as long as
    # `config` lives, so each from_pretrained below creates its model already partitioned (deepspeed.zero.Init)
    # instead of materialising it whole in every process.
    model_kwargs = {"attn_implementation": attn_implementation()}
    policy = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=torch.float32, **model_kwargs
    )
    if lora_args.lora_r:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(lora_args))
        ref_policy = None  # the reference is the policy with its adapter switched off: no second copy
    else:
        # The reference computes log-probabilities as the policy does: in bf16 weights under DeepSpeed's bf16
        # mode, in fp32 weights under autocast otherwise, so that the KL starts at exactly zero.
        ref_dtype = torch.bfloat16 if config.bf16 and config.deepspeed_plugin is not None else torch.float32
        ref_policy = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, dtype=ref_dtype, **model_kwargs
        )
    if value_path != model_args.model_name_or_path:
        check_same_tokenizer(tokenizer, value_path)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        value_path, num_labels=1, dtype=torch.float32, **model_kwargs
    )
    value_model.config.pad_token_id = tokenizer.pad_token_id
    if lora_args.lora_r and model_args.lora_value_model:
        from peft import get_peft_model

        value_model = get_peft_model(value_model, lora_config(lora_args, task_type="SEQ_CLS"))

    # ==============================================================================
    # Run: PPO updates with periodic evaluation and checkpoints
    # ==============================================================================
    trainer = PPOTrainer(
        config,
        tokenizer,
        policy,
        ref_policy,
        value_model,
        reward_fn,
        train_set,
        eval_set,
        run_config=run_args,
    )
    last = trainer.train(resume_from=find_checkpoint(config.resume_from_checkpoint, config.output_dir))

    # ==============================================================================
    # Save: the final policy is already at --output_dir; report where things are
    # ==============================================================================
    state.print(
        f"final policy: {output_dir} (load with AutoModelForCausalLM); metrics: {trainer.metrics_path}"
    )
    if last:
        state.print(
            f"last update: score {last['objective/scores']:.3f}, kl {last['objective/kl']:.4f}, "
            f"{last['eps']:.2f} episodes/s"
        )
    return trainer


if __name__ == "__main__":
    main(parse_args())
