"""Run by test_ddp.py under torchrun: 2 CPU processes (gloo) train DPO on 7 pairs (one left over, as 7 = 2 × 3 + 1)
for 2 epochs of 2 pairs a step; each writes the pairs it trained on, step by step, and its history."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.data.records import PreferencePair
from rlhfkit.rl.dpo import DPOConfig, DPOTrainer


def main(out: Path) -> None:
    words = "happy kind nice good calm warm sunny".split()
    pairs = [PreferencePair(prompt=f"how do i fix bike {w}", chosen=w, rejected="stupid dumb idiot") for w in words]
    trainer = DPOTrainer(DPOConfig(batch_size=2, epochs=2, eval_fraction=0.0, seed=3, lr=1e-3,
                                   output_dir=str(out / "run")), build_tiny_causal(), word_tokenizer())
    steps, batch = [], trainer.batch
    trainer.batch = lambda step_pairs: steps.append([p.chosen for p in step_pairs]) or batch(step_pairs)
    trainer.train(pairs, eval_pairs=pairs[:2], progress=False)
    rank = trainer.accelerator.process_index
    (out / f"dpo_rank{rank}.json").write_text(json.dumps({
        "world": trainer.accelerator.num_processes, "batches": steps,
        "history": [{k: v for k, v in h.items() if k != "time/step_s"} for h in trainer.history]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
