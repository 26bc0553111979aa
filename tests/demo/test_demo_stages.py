"""The demo's stages (demo/stages.py)."""

from rlhfkit.data.records import Completion
from rlhfkit.demo import DemoConfig
from rlhfkit.demo.stages import demo_task, label_in_app


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
