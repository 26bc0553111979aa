"""Write DialogSum summarisation prompts for the course-lab recipe (needs model-hub access).

    python examples/course_lab/prepare_prompts.py --out runs/course_lab

Dialogues of 200 to 1000 characters, as in the lab, formatted with the lab's instruction; the train split
feeds PPO and the test split is held out for `rlhfkit evaluate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhfkit.data.io import write_records
from rlhfkit.data.records import Prompt

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


def dialogue_prompts(rows, split: str, min_chars: int = 200, max_chars: int = 1000, limit: int | None = None):
    prompts = []
    for row in rows:
        if min_chars <= len(row["dialogue"]) <= max_chars:
            prompts.append(Prompt(id=f"dialogsum-{split}-{row['id']}", text=TEMPLATE.format(dialogue=row["dialogue"])))
            if limit is not None and len(prompts) == limit:
                break
    return prompts


def main() -> None:
    from datasets import load_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/course_lab"))
    parser.add_argument("--test-prompts", type=int, default=100)
    args = parser.parse_args()
    data = load_dataset("knkarthick/dialogsum")
    args.out.mkdir(parents=True, exist_ok=True)
    write_records(args.out / "train_prompts.jsonl", dialogue_prompts(data["train"], "train"))
    write_records(args.out / "test_prompts.jsonl", dialogue_prompts(data["test"], "test", limit=args.test_prompts))
    print(f"prompts → {args.out}/train_prompts.jsonl, {args.out}/test_prompts.jsonl")


if __name__ == "__main__":
    main()
