"""The demo's stages (demo/stages.py)."""

from rlhfkit.data.records import Completion
from rlhfkit.demo import DemoConfig
from rlhfkit.demo.stages import demo_task, label_in_app, rl_settings


def test_the_same_seed_gives_the_same_labels_in_the_same_order_whatever_order_the_app_offers_the_items_in(
        tmp_path):
    """The app offers equally full items in random order; the simulated labels, and the order of the
    rankings (hence of the reward model's pairs), must not depend on it."""
    config = DemoConfig(label_prompts=6, eval_prompts=3)
    task = demo_task(config)
    completions = [Completion(id=f"{p.id}-{k}", prompt_id=p.id, prompt=p.text, index=k, text=text)
                   for p in task.train_prompts
                   for k, text in enumerate([f"For {p.text.lower()} practise daily.", "You idiot, no.", "Hello."])]

    def labels(db: str) -> list[tuple]:
        rankings, _ = label_in_app(tmp_path / db, completions, task, config, seed=3)
        return [(r.labeler_id, r.prompt_id, str(r.groups)) for r in rankings]

    first = labels("a.db")
    assert len(first) == 6 * len(config.labelers) and labels("b.db") == first


def test_the_rl_stage_takes_the_demos_batch_as_answers_for_every_algorithm(tmp_path):
    """A step holds ppo_batch_size answers whatever the algorithm: GRPO and RLOO sample them as groups of
    group_size answers to ppo_batch_size / group_size prompts; RLOO keeps its own baseline and KL in the reward."""
    def settings(**overrides):
        return rl_settings(DemoConfig(ppo_batch_size=8, ppo_minibatch_size=8, **overrides), 3, tmp_path)

    ppo, grpo, rloo = settings(), settings(algorithm="grpo", group_size=4), settings(algorithm="rloo", group_size=2)
    assert type(ppo).__name__ == "PPOConfig" and ppo.batch_size == 8 and ppo.seed == 3
    assert (grpo.batch_size, grpo.group_size, grpo.advantage, grpo.kl_penalty) == (2, 4, "grpo", "loss")
    assert (rloo.batch_size, rloo.group_size, rloo.advantage, rloo.kl_penalty) == (4, 2, "rloo", "reward")
    assert ppo.kl_coef == grpo.kl_coef == rloo.kl_coef == DemoConfig().kl_coef
