"""What PPO, GRPO and RLOO share: prompt order, rollouts, the optimiser under `accelerate`, logging,
stopping rules and checkpoints. Each algorithm adds only its ``update(rollout) -> stats``.

Under ``accelerate launch`` (DDP, FSDP, DeepSpeed) every process takes its own slice of each step's
prompts, and gradients are averaged by the wrapper; logged numbers are means over all processes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from accelerate import Accelerator
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import require, require_field_types, require_seed, save_config
from rlhfkit.console import console
from rlhfkit.data.io import DataError
from rlhfkit.data.order import epoch_order
from rlhfkit.data.records import Prompt, Text
from rlhfkit.generate import format_prompt
from rlhfkit.models.policy import SamplingDistribution, cast_trainable, check_prompt_lengths, prepare_tokenizer
from rlhfkit.models.reference import Reference, add_lora, is_lora
from rlhfkit.models.update import TrainingDiverged, adamw, apply_gradients
from rlhfkit.models.value_head import Actor
from rlhfkit.precision import Precision, PrecisionSetting, training_precision
from rlhfkit.reward.base import RewardError, RewardFn
from rlhfkit.rl.monitors import MOMENTS, RewardHackingMonitor, pooled_spreads
from rlhfkit.rollout import Rollout, collect_rollout

T = TypeVar("T")


@dataclass
class RLConfig:
    """Settings shared by the on-policy trainers."""

    steps: int = 100  # maximum number of rollouts (= outer steps)
    batch_size: int = 16  # prompts per step on each process
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens (in sampling and in log-probs)
    kl_coef: float = 0.05  # β of the KL penalty against the reference
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    reward_threshold: float | None = None  # stop once a step's mean reward reaches this
    seed: int = 0
    use_chat_template: bool = False  # format prompts with the tokenizer's chat template
    lora: bool = False  # train LoRA adapters; the reference is then the base with the adapter disabled
    lora_r: int = 8
    lora_alpha: int = 16
    output_dir: str = "runs/rl"
    save_every: int = 0  # checkpoint every this many steps (0: only at the end)
    log_dir: str | None = None  # TensorBoard logs (default: OUTPUT_DIR/tensorboard)
    # dtype of the weights the optimiser updates: float32 master weights even for a bf16 checkpoint (an
    # update smaller than bf16's resolution would round away); bfloat16 only to halve their memory
    weights_dtype: Literal["float32", "bfloat16"] = "float32"
    # matrix products in bf16 under autocast where the hardware has a bf16 unit (auto), always (bf16: an
    # error without one) or never (fp32); see rlhfkit/precision.py
    precision: PrecisionSetting = "auto"

    def __post_init__(self) -> None:
        require_field_types(self)
        for name in ("save_every", "min_new_tokens"):
            require(getattr(self, name) >= 0, name, "must be at least 0")
        for name in ("steps", "batch_size", "max_new_tokens", "lora_r"):  # steps 0 would save an untrained policy
            require(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("lr", "temperature", "max_grad_norm"):
            require(getattr(self, name) > 0, name, "must be positive")
        require(self.kl_coef >= 0, "kl_coef", "must be at least 0 (β weighs a penalty)")
        require(self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "exceeds max_new_tokens")
        require_seed(self.seed)


def prepare_training(config, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     reference: Reference | None, accelerator: Accelerator, value_head: bool,
                     precision: Precision):
    """What every policy trainer sets up: dropout off (a rollout's log-probs must be reproducible in the
    update), LoRA if asked, trainable weights in ``config.weights_dtype`` (float32 master weights by
    default), the tokenizer, the reference on the policy's device and in the policy's precision (so
    that KL is zero before the first update), the actor (its forward under ``precision``'s autocast)
    and its AdamW, prepared by `accelerate`. Returns (tokenizer, reference, actor, optimizer)."""
    check_replaceable(Path(config.output_dir) / "policy")  # before training, not after it
    policy.eval()
    if config.lora and not is_lora(policy):
        policy = add_lora(policy, config.lora_r, config.lora_alpha)
    dtype = getattr(torch, config.weights_dtype)
    cast_trainable(policy, dtype)
    tokenizer = prepare_tokenizer(tokenizer, policy)
    if reference is not None and not reference.shared:
        reference.model.to(next(policy.parameters()).dtype)
    reference = (reference or Reference(policy)).to(accelerator.device)
    actor = Actor(policy, value_head=value_head).to(accelerator.device)
    precision.autocast_forward(actor)
    # The actor is not torch.compile'd: on the 5.3M benchmark policy a compiled forward + backward was 1.06×
    # (bf16) to 1.08× (fp32) faster after 43-58 s of compiling, repaid after ~1400 steps of one shape only
    optimizer = adamw(actor.parameters(), config.lr, accelerator.device)
    return (tokenizer, reference, *accelerator.prepare(actor, optimizer))


def partial_folder(path: Path) -> Path:
    """Where a folder is written before it is moved into place: hidden, next to it, on the same disk."""
    return path.with_name(f".{path.name}.partial")


def check_replaceable(path: Path) -> None:
    """Saving replaces ``path`` whole: refuse a file, or a folder with anything in it that rlhfkit did not
    write (it writes a ``*_config.yaml`` into every policy and checkpoint folder)."""
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not any(path.glob("*_config.yaml"))):
        raise FileExistsError(f"{path}: exists and is not a policy or checkpoint saved by rlhfkit (saving "
                              "replaces the folder); choose another output_dir")


def publish_folder(path: Path) -> None:
    """Move the fully written :func:`partial_folder` of ``path`` into place (replacing an older one). A
    run killed while writing leaves only the hidden partial folder, never a ``path`` that looks done."""
    check_replaceable(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial_folder(path), path)


def save_as_loaded(model: PreTrainedModel, path: Path) -> None:
    """``model.save_pretrained(path)`` with its ``generation_config`` written as it is. transformers checks a
    generation config strictly when saving and refuses settings it loaded without complaint (a checkpoint's
    ``cache_implementation`` without ``use_cache``, ``top_p`` without ``do_sample``): that would lose a
    finished run at its last step, for settings rlhfkit's sampling never reads."""
    own = None if is_lora(model) else model.generation_config
    if own is None:  # a LoRA adapter folder has no generation config
        model.save_pretrained(path)
        return
    model.generation_config = GenerationConfig()
    try:
        model.save_pretrained(path)
    finally:
        model.generation_config = own
    own.to_json_file(path / "generation_config.json", use_diff=True)


def save_trained_policy(accelerator: Accelerator, actor: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config,
                algorithm: str, path: str | os.PathLike) -> None:
    """The trained policy as a `save_pretrained` folder (LoRA: the adapter), with the run's config;
    written whole or not at all (see :func:`publish_folder`)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path, partial = Path(path), partial_folder(Path(path))
        shutil.rmtree(partial, ignore_errors=True)
        try:
            save_as_loaded(accelerator.unwrap_model(actor).model, partial)
            tokenizer.save_pretrained(partial)
            save_config(config, partial / f"{algorithm}_config.yaml")
            publish_folder(path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def read_checkpoint_file(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)``; a missing file or one that cannot be read (cut short by a crash, corrupted) is a
    DataError naming it, not the reader's traceback."""
    if not path.is_file():
        raise DataError("missing from the checkpoint; resume from another checkpoint", path)
    try:
        return read(path)
    except Exception as exc:  # safetensors, torch.load and json each raise their own kinds
        raise DataError(f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "the checkpoint is damaged, resume from another one", path) from exc


def check_run_inputs(prompts: Sequence[Text], reward_fn: RewardFn) -> None:
    """What a Python caller can get wrong before any rollout: no prompts, one string instead of a list of
    them (its characters would be the prompts), a blank prompt, a reward that cannot be called (a spec
    string: resolve it with ``rlhfkit.reward.spec.load_reward``). Each is an error naming the prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, got a {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts to train on")
    for index, text in enumerate(prompts):
        try:
            Prompt(id=str(index), text=text)
        except ValidationError as exc:
            raise ValueError(f"prompts[{index}]: {exc.errors()[0]['msg']} (got {text!r})") from None
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as reward(prompts, completions), got {reward_fn!r}; a spec "
                        "string such as 'judge:sentiment' is resolved by rlhfkit.reward.spec.load_reward")


class OnPolicyTrainer:
    """The outer loop: rollout → algorithm update → log → maybe checkpoint or stop."""

    algorithm = "rl"
    uses_value_head = False

    def __init__(self, config: RLConfig, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 reward_fn: RewardFn, prompts: Sequence[Text], reference: Reference | None = None,
                 accelerator: Accelerator | None = None, monitor: RewardHackingMonitor | None = None) -> None:
        check_run_inputs(prompts, reward_fn)
        self.config, self.reward_fn, self.prompts, self.monitor = config, reward_fn, list(prompts), monitor
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        torch.manual_seed(config.seed + self.accelerator.process_index)
        self.precision = training_precision(config, self.accelerator)
        self.tokenizer, self.reference, self.actor, self.optimizer = prepare_training(
            config, policy, tokenizer, reference, self.accelerator, self.uses_value_head, self.precision)
        self.sampling = SamplingDistribution(config.temperature, config.min_new_tokens, self.tokenizer.eos_token_id)
        self.check_prompts_fit()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.stop_reason = ""
        self._writer = None
        self._orders: dict[int, list[int]] = {}  # prompt order of the current and previous epoch

    # ------------------------------------------------------------ data
    def check_prompts_fit(self) -> None:
        """Every prompt leaves room for max_new_tokens in the model's positions: checked once, before
        training, rather than at the step that first draws a long prompt."""
        use_chat = self.config.use_chat_template
        texts = [format_prompt(p, self.tokenizer, use_chat) for p in self.prompts]
        lengths = self.tokenizer(texts, padding=True, add_special_tokens=not use_chat, return_tensors="pt")
        check_prompt_lengths(self._bare_actor().model, lengths["attention_mask"], texts, self.config.max_new_tokens)

    def prompts_for_step(self, step: int) -> list[Text]:
        """This process's prompts for ``step``: epochs are seeded permutations of the prompt list, each
        step takes the next batch_size × num_processes of them, each process its own slice. A function
        of the step alone, so a resumed run continues with the same data."""
        n, world = len(self.prompts), self.accelerator.num_processes
        per_step = self.config.batch_size * world
        start = step * per_step + self.accelerator.process_index * self.config.batch_size
        chosen = []
        for index in range(start, start + self.config.batch_size):
            epoch, position = divmod(index, n)
            chosen.append(self.prompts[self._epoch_order(epoch)[position]])
        return chosen

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.prompts), self.config.seed, epoch),
                            **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    samples_per_prompt = 1  # completions sampled per prompt
    one_minibatch = False  # each epoch of the update is one minibatch: the whole rollout

    def rollout(self, prompts: Sequence[Text]) -> Rollout:
        """Sampling, the reference's (and the policy's) log-probs, all in the training precision: the
        samples come from the distribution the update scores, and KL is zero before the first update."""
        with self.precision.autocast():
            return collect_rollout(self.actor, self.reference, self.tokenizer, prompts, self.reward_fn,
                                   self.sampling, self.config.max_new_tokens, self.samples_per_prompt,
                                   self.config.use_chat_template, policy_logprobs=not self.one_minibatch)

    def policy_pass(self, rollout: Rollout) -> tuple | None:
        """When an epoch is one minibatch of the whole rollout, the first epoch's pass reads π_θ_old, which is
        π_θ before its first step: the rollout skipped the policy's forward pass, and the update's own first
        pass (returned, with gradients) fills the rollout's old log-probs and values (detached). One forward
        pass fewer per step, the same update."""
        if rollout.logprobs is not None:
            return None
        outputs = self.actor(rollout.batch, self.sampling)
        rollout.logprobs = outputs[0].detach()
        rollout.values = outputs[2].detach() if outputs[2] is not None else None
        return outputs

    def minibatches(self, n: int, size: int, device: torch.device) -> list[torch.Tensor]:
        """Index sets of one epoch: shuffled, or the rollout in order when one minibatch holds it all."""
        order = torch.arange(n) if size >= n else torch.randperm(n)
        return [order[start:start + size].to(device) for start in range(0, n, size)]

    # ------------------------------------------------------------ the algorithm
    def update(self, rollout: Rollout) -> dict[str, float]:
        raise NotImplementedError

    def optimizer_step(self, loss: torch.Tensor) -> float:
        return apply_gradients(self.accelerator, self.actor, self.optimizer, loss, self.config.max_grad_norm)

    def train_step(self) -> dict[str, float]:
        """One rollout and its update. A reward or a monitor's judge that breaks its contract (NaN, wrong shape) or a
        non-finite loss stops training with the step and the cause; the policy is not saved."""
        started = time.perf_counter()
        try:
            rollout = self.rollout(self.prompts_for_step(self.step))
            stats = self.update(rollout)
            if self.monitor is not None:
                stats |= self.monitor.measure(rollout.prompts, rollout.completions, rollout.scores)
        except (RewardError, TrainingDiverged) as exc:
            raise type(exc)(f"{self.algorithm} stopped at step {self.step + 1}: {exc}") from None
        stats = self.mean_over_processes(stats)
        self.step += 1
        stats["time/step_s"] = time.perf_counter() - started
        self.history.append({"step": self.step, **stats})
        self.log(stats)
        return stats

    def should_stop(self) -> str:
        """Why training stops after the last step of the history (reward threshold, monitor), or ""."""
        if not self.history:
            return ""
        score, threshold = self.history[-1]["reward/score"], self.config.reward_threshold
        if threshold is not None and score >= threshold:
            return f"mean reward {score:.4f} ≥ threshold {threshold}"
        return (self.monitor.check(self.history) or "") if self.monitor is not None else ""

    def train(self) -> list[dict[str, float]]:
        """Run until ``steps`` rollouts, the reward threshold or a monitor's stop; saves checkpoints and the
        final policy. A run resumed from the checkpoint of the step where it stopped stops there again."""
        cfg = self.config
        self.stop_reason = self.should_stop()
        while self.step < cfg.steps and not self.stop_reason:
            self.train_step()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint(Path(cfg.output_dir) / f"checkpoint-{self.step}")
            self.stop_reason = self.should_stop()
        self.stop_reason = self.stop_reason or f"reached {cfg.steps} steps"
        if self.accelerator.is_main_process:
            console.print(f"[bold]{self.algorithm} stopped at step {self.step}:[/] {self.stop_reason}")
        self.save_policy(Path(cfg.output_dir) / "policy")
        if self._writer is not None:
            self._writer.close()
        return self.history

    # ------------------------------------------------------------ logging
    # stats that count or sum things: summed over processes, not averaged
    COUNTS = ("monitor/answers", "monitor/prompts", *MOMENTS)

    def mean_over_processes(self, stats: dict[str, float]) -> dict[str, float]:
        """Each stat's mean over the processes, but ``COUNTS``, summed (the relevance alarm's standard error
        reads the answers and prompts of every process), and the relevance stds, those of every process's values
        (:func:`~rlhfkit.rl.monitors.pooled_spreads`)."""
        world = self.accelerator.num_processes
        if world == 1:
            return pooled_spreads(stats, pooled=False)
        keys = sorted(stats)
        # float64: a std pooled from sums of squares loses digits in float32 (3e-5 for two equal values)
        values = torch.tensor([stats[k] for k in keys], device=self.accelerator.device, dtype=torch.float64)
        means = self.accelerator.reduce(values, reduction="mean").tolist()
        return pooled_spreads({k: v * world if k in self.COUNTS else v for k, v in zip(keys, means, strict=True)},
                              pooled=True)

    def log(self, stats: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.config.log_dir or str(Path(self.config.output_dir) / "tensorboard"))
        for key, value in stats.items():
            self._writer.add_scalar(key, value, self.step)
        shown = {k.split("/")[-1]: v for k, v in stats.items() if k in self.console_keys}
        console.print(f"[bold]{self.algorithm}[/] step {self.step}/{self.config.steps} "
                      + " ".join(f"{k} {v:.4g}" for k, v in shown.items()), highlight=False)

    console_keys = ("reward/score", "reward/total", "kl/kl", "policy/entropy", "loss/policy", "loss/value",
                    "policy/clipfrac", "policy/approx_kl", "value/explained_variance", "response/length",
                    "monitor/judge")

    # ------------------------------------------------------------ checkpoints
    def _bare_actor(self) -> Actor:
        return self.accelerator.unwrap_model(self.actor)

    def save_policy(self, path: str | os.PathLike) -> None:
        save_trained_policy(self.accelerator, self.actor, self.tokenizer, self.config, self.algorithm, path)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Everything needed to continue exactly: trainable weights (and value head), optimizer, KL
        controller, step, history, each process's RNG state (CPU, and CUDA on a GPU), and the config."""
        path, partial = Path(path), partial_folder(Path(path))
        main = self.accelerator.is_main_process
        self.accelerator.wait_for_everyone()
        try:
            if main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
                trainable = {n: p.detach().contiguous().cpu() for n, p in self._bare_actor().named_parameters()
                             if p.requires_grad}
                save_file(trainable, partial / "trainable.safetensors")
                torch.save(self.optimizer.state_dict(), partial / "optimizer.pt")
                state = {"step": self.step, "history": self.history, **self.extra_state()}
                (partial / "trainer_state.json").write_text(json.dumps(state, indent=1))
                save_config(self.config, partial / f"{self.algorithm}_config.yaml")
            self.accelerator.wait_for_everyone()
            torch.save(self.rng_state(), partial / f"rng-{self.accelerator.process_index}.pt")
            self.accelerator.wait_for_everyone()
            if main:
                publish_folder(path)
        except BaseException:
            if main:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        self.accelerator.wait_for_everyone()

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This process's random state: the CPU generator's and, on a GPU, its device's (sampling draws there)."""
        state = {"cpu": torch.get_rng_state()}
        if self.accelerator.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.accelerator.device)
        return state

    def set_rng_state(self, state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        if isinstance(state, torch.Tensor):  # a checkpoint from before the CUDA state was kept
            state = {"cpu": state}
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.accelerator.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.accelerator.device)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from a :meth:`save_checkpoint` folder; a missing or damaged file is a DataError naming it."""
        path = Path(path)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{path} is not an rlhfkit checkpoint (no trainer_state.json)")
        weights = read_checkpoint_file(path / "trainable.safetensors", load_file)
        own = self._bare_actor().state_dict()
        for name, tensor in weights.items():
            if name in own and own[name].shape != tensor.shape:
                raise DataError(f"weight {name!r} is {list(tensor.shape)} in the checkpoint but "
                                f"{list(own[name].shape)} in this policy; resume with the policy the checkpoint "
                                "was trained from", path / "trainable.safetensors")
        missing = self._bare_actor().load_state_dict(weights, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{path}: checkpoint has weights this model lacks: {missing.unexpected_keys[:5]}")
        optimizer_state = read_checkpoint_file(path / "optimizer.pt", lambda f: torch.load(f, weights_only=False))
        state = read_checkpoint_file(path / "trainer_state.json", lambda f: json.loads(f.read_text()))
        rng = read_checkpoint_file(path / f"rng-{self.accelerator.process_index}.pt", torch.load)
        self.optimizer.load_state_dict(optimizer_state)
        self.step, self.history = state["step"], state["history"]
        self.load_extra_state(state)
        self.set_rng_state(rng)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
