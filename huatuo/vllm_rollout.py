"""vLLM as the rollout engine of stage 2, the same on a CPU as on GPUs.

Each training process runs its own vLLM engine in-process (colocated, TRL's VLLMGeneration), samples its share of
the prompts from token ids, and takes the policy's weights after every update. Two things differ from TRL's wrapper:

- The weights go in through vLLM's layerwise reload (`reload_weights`), which re-runs each layer's post-load
  processing. Writing into the engine's parameters directly, as TRL does, fails on platforms that repack weights
  after loading: on the CPU the linear layers drop their loaders ("'Parameter' object has no attribute
  'weight_loader'").
- A LoRA policy is sent merged into a copy of its weights. TRL merges the adapter into the live base weights and
  unmerges it after the push, and (W + BA) - BA rounds W, so the frozen reference (the policy with its adapter
  off) would drift a little at every sync.

PPO (huatuo/ppo_trainer.py) builds a VLLMRollout itself; GRPO and RLOO (huatuo/rl_trl.py) get TRL's own engine and
switch it to this class with `use_vllm_rollout`.
"""

from __future__ import annotations

from accelerate.utils import is_peft_model
from trl.generation.vllm_generation import VLLMGeneration

from huatuo.lora import merged_state_dict
from huatuo.models import check_vllm_installed


class VLLMRollout(VLLMGeneration):
    """TRL's colocated vLLM generation with a weight sync that works on every vLLM platform and never touches
    the live weights of a LoRA policy."""

    def sync_weights(self) -> None:
        if self.mode != "colocate":
            return super().sync_weights()
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=self._engine_weights(), is_checkpoint_format=True)
        self.llm.reset_prefix_cache()

    def _engine_weights(self):
        """(name, tensor) in the checkpoint's names and the engine's dtype. Each tensor is a copy: vLLM holds on to
        a layer's tensors until the whole layer has arrived, and under ZeRO-3 a gathered parameter is released
        as soon as its gather ends."""
        dtype = self.llm.llm_engine.model_config.dtype
        model = self.model
        if is_peft_model(model):
            # merging needs every weight of a layer at once, so a sharded LoRA policy is gathered whole
            with self._dist.gather_params(list(model.parameters())):
                state = {name: param.data for name, param in model.named_parameters()}
                for name, tensor in merged_state_dict(model, state).items():
                    yield name, tensor.to(dtype=dtype, copy=True)
            return
        for name, param in model.named_parameters():
            with self._dist.gather_params([param]):
                yield name, param.data.to(dtype=dtype, copy=True)


def use_vllm_rollout(generation) -> None:
    """Give an engine TRL built (GRPO, RLOO) the weight sync of VLLMRollout."""
    generation.__class__ = VLLMRollout


def make_vllm_rollout(
    policy, accelerator, tokenizer, config, max_model_length: int, stop_token_ids: list[int]
):
    """The colocated engine PPO samples from: `config.response_length` new tokens at `config.temperature`, no top-k
    or top-p (the log-probabilities PPO trains on are the policy's own at that temperature), stopping on the
    policy's stop tokens. max_model_length is the longest prompt plus the response length: left at the model's own
    limit, a Llama-3.1 asks for a 131,072-token KV cache and does not start at a small memory share."""
    check_vllm_installed()
    return VLLMRollout(
        policy,
        accelerator,
        tokenizer,
        mode="colocate",
        tensor_parallel_size=config.vllm_tensor_parallel_size,
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        max_model_length=max_model_length,
        enable_sleep_mode=config.vllm_enable_sleep_mode,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        max_completion_length=config.response_length,
        logprobs=None,
        generation_kwargs={"stop_token_ids": stop_token_ids},
    )
