"""DPO, GRPO, RLOO and PPO on the shared benchmark workload (../shared/bench), done with rlhfkit.

The same work as the TRL runners (run_dpo.py, run_grpo.py, run_rloo.py, run_ppo.py): the same
5.3M-parameter GPT-2 policy from the same initial weights, the same prompts, pairs and target-token
reward, batch shapes, step counts and optimiser settings; completions are exactly 32 tokens (EOS
forbidden before, as TRL's `min_new_tokens`). GRPO's KL term is importance-weighted (rlhfkit's
``kl_importance_weight``, TRL's ``use_bias_correction_kl``, both on by default). Differences by design:
rlhfkit's PPO critic is a value head on the policy's trunk, TRL's a separate 5.3M-parameter value model;
rlhfkit's log-probs are those of the distribution sampled from (EOS excluded for the first 32 tokens),
TRL's of the plain softmax.
Writes ``rlhfkit_<algo>.json`` next to the TRL results with the same keys.

    python benchmarks/rl_workload.py grpo [--bench-dir ../shared/bench] [--precision fp32]
    python benchmarks/rl_workload.py dpo --seed 1235    # the pairs TRL trains on at seed 1235, in its order
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from compare_trl import code_digest  # this folder: sys.path[0] when run as a script

TRENDS = {"dpo": ["loss", "accuracy", "margin", "grad_norm"],
          "grpo": ["reward/score", "kl/kl", "policy/entropy", "policy/grad_norm"],
          "rloo": ["reward/score", "kl/kl", "policy/entropy"],
          "ppo": ["reward/score", "kl/kl", "policy/entropy", "value/explained_variance"]}


def instrument_engine(stats) -> None:
    """Time every call of the rollout engine into ``stats`` (bench_common's GenStats): rlhfkit samples
    through it, not through ``model.generate``, which ``bench_common.instrument_generate`` times."""
    from rlhfkit.models import engine

    inner = engine.ENGINE

    def timed(*args, **kwargs):
        started = time.perf_counter()
        completions = inner(*args, **kwargs)
        seconds = time.perf_counter() - started
        stats.calls += 1
        stats.tokens += completions.numel()
        stats.seconds += seconds
        stats.per_step.append((completions.numel(), seconds))
        return completions

    engine.ENGINE = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algo", choices=sorted(TRENDS))
    parser.add_argument("--bench-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed: prompt/pair order and sampling (default: the workload's SEED); "
                             "initial weights and data stay the workload's")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the trainers' precision (see rlhfkit/precision.py)")
    parser.add_argument("--action", choices=["token", "completion"], default=None,
                        help="GRPO/RLOO: the unit of the ratio and surrogate (rlhfkit.rl.grpo; default: the config's)")
    parser.add_argument("--engine", choices=["rlhfkit", "generate"], default="rlhfkit",
                        help="sample through rlhfkit's rollout engine or through transformers' generate")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the workload's NUM_THREADS); learning depends on it only through "
                             "rounding (bf16 autocast: in the fourth decimal)")
    args = parser.parse_args()
    if not (Path(args.bench_dir) / "workload.py").is_file():
        parser.error(f"--bench-dir {args.bench_dir}: no workload.py there (the shared benchmark workload)")
    sys.path.insert(0, args.bench_dir)
    import bench_common as B
    import workload as W

    seed = W.SEED if args.seed is None else args.seed
    W.NUM_THREADS = args.threads or W.NUM_THREADS

    B.setup_process()
    t_start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.console import console
    from rlhfkit.data.records import PreferencePair
    from rlhfkit.reward.base import FunctionReward
    from rlhfkit.rl.dpo import DPOConfig, DPOTrainer
    from rlhfkit.rl.grpo import GRPOConfig, GRPOTrainer, rloo_config
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    console.quiet = True
    paths = W.prepare_artifacts()
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    gen = B.GenStats()
    if args.engine == "generate":
        from rlhfkit.models import engine

        engine.ENGINE = engine.generate_sampling
    instrument_engine(gen)
    out = tempfile.mkdtemp(prefix="rlhfkit-bench-")

    if args.algo == "dpo":
        wl = W.DPO
        pairs = [PreferencePair(**p) for p in W.preference_pairs()]
        trainer = DPOTrainer(DPOConfig(beta=wl.beta, lr=wl.lr, batch_size=wl.pairs_per_step, max_steps=wl.steps,
                                       epochs=1 + wl.steps * wl.pairs_per_step // len(pairs), eval_fraction=0.0,
                                       max_grad_norm=wl.max_grad_norm, seed=seed, output_dir=out,
                                       precision=args.precision),
                             policy, tokenizer)
        trained = time.perf_counter()
        history = [h for h in trainer.train(pairs, eval_pairs=[], progress=False) if "loss" in h]
        gen = None
    else:
        def target_fraction(prompts, completions):
            return [W.target_fraction([W.WORD_TO_ID.get(w, W.UNK_ID) for w in c.split()]) for c in completions]

        reward = FunctionReward(target_fraction, batched=True)
        common = dict(lr=W.GRPO.lr, max_grad_norm=1.0, temperature=1.0, max_new_tokens=W.COMPLETION_LEN,
                      min_new_tokens=W.COMPLETION_LEN, seed=seed, output_dir=out, precision=args.precision)
        if args.algo == "ppo":
            wl = W.PPO
            config = PPOConfig(steps=wl.steps, batch_size=wl.prompts_per_step, minibatch_size=wl.prompts_per_step,
                               ppo_epochs=wl.ppo_epochs, kl_coef=wl.kl_coef, kl_estimator=wl.kl_estimator,
                               gamma=wl.gamma, lam=wl.lam, clip_eps=wl.cliprange, value_clip=wl.cliprange_value,
                               vf_coef=wl.vf_coef, entropy_coef=wl.entropy_coef, **common)
            trainer = PPOTrainer(config, policy, tokenizer, reward, W.prompts())
        else:
            wl = W.GRPO if args.algo == "grpo" else W.RLOO
            group = dict(steps=wl.steps, batch_size=wl.prompts_per_step, group_size=wl.generations_per_prompt,
                         epochs=wl.num_iterations, clip_eps=wl.epsilon, kl_coef=wl.beta, **common)
            group |= {"action": args.action} if args.action else {}
            config = GRPOConfig(**group) if args.algo == "grpo" else rloo_config(**group)
            trainer = GRPOTrainer(config, policy, tokenizer, reward, W.prompts())
        trained = time.perf_counter()
        history = [trainer.train_step() for _ in range(wl.steps)]

    timer = SimpleNamespace(step_times=[h["time/step_s"] for h in history], logs=history,
                            t_train_begin=trained, t_train_end=time.perf_counter())
    B.finish(f"rlhfkit_{args.algo}", timer, wl.warmup_steps_excluded,
             {"workload": args.algo, "seed": seed, "params": B.param_count(policy),
              "precision": str(trainer.precision), "action": getattr(trainer.config, "action", None),
              "engine": args.engine, "code": code_digest()},
             TRENDS[args.algo], gen=gen, t_start=t_start)


if __name__ == "__main__":
    main()
