"""The demo's toy instruct model: a small GPT-2 trained from scratch, in about a minute on a CPU, on a
corpus written for rlhfkit (``resources/toy_corpus.yaml``) in which requests about everyday topics
are answered kindly, rudely, or with an empty pleasantry. It starts out rude about half the time, which
gives RLHF something to align away, and it is small enough that PPO runs in minutes on a laptop.

The tokenizer is a byte-level BPE learned from the corpus, with a chat template, so the toy model is
driven exactly like a real instruct model. The trained model is cached (keyed by the corpus and the
settings), so a second run loads it in a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhfkit.console import console, progress_bar
from rlhfkit.data.io import write_folder_once
from rlhfkit.data.records import Prompt

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
SPECIAL = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
# threads of the toy model's training, whatever the caller's: its sums split per thread, so the weights (up to
# 0.04 apart on the demo's model between 1 and 2 threads) and every demo number after them depend on it
TRAINING_THREADS = 2


def toy_corpus() -> dict:
    return yaml.safe_load((files("rlhfkit") / "resources" / "toy_corpus.yaml").read_text())


def toy_prompts(topics: list[str], corpus: dict | None = None, per_topic: int = 2, seed: int = 0,
                prefix: str = "toy") -> list[Prompt]:
    """``per_topic`` requests about each topic, with templates drawn at random (no repeats per topic)."""
    corpus = corpus or toy_corpus()
    rng = random.Random(seed)
    prompts = []
    for topic in topics:
        for j, template in enumerate(rng.sample(corpus["prompts"], per_topic)):
            slug = topic.replace(" ", "-")
            prompts.append(Prompt(id=f"{prefix}-{slug}-{j}", text=template.format(topic=topic)))
    return prompts


def corpus_examples(corpus: dict, size: int, seed: int, mix: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """(request, reply) pairs drawn with ``mix`` (the share of kind, rude and empty replies; default: the
    corpus's); a kind or rude reply is an opener of that kind followed by a piece of advice about the topic."""
    rng = random.Random(seed)
    kinds, weights = zip(*(mix or corpus["mix"]).items(), strict=True)
    examples = []
    for _ in range(size):
        topic = rng.choice(corpus["topics"])
        kind = rng.choices(kinds, weights)[0]
        if kind == "empty":
            reply = rng.choice(corpus["empty"])
        else:
            reply = f"{rng.choice(corpus['openers'][kind])} {rng.choice(corpus['advice']).format(topic=topic)}"
        examples.append((rng.choice(corpus["prompts"]).format(topic=topic), reply[0].upper() + reply[1:]))
    return examples


@dataclass
class ToyPolicyConfig:
    examples: int = 6000
    epochs: int = 3
    batch_size: int = 16  # more, smaller steps: the model learns to copy the topic from the request
    lr: float = 3e-3
    vocab_size: int = 1000
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    seed: int = 0
    mix: dict[str, float] | None = None  # the share of kind, rude and empty replies (None: the corpus's)

    def __post_init__(self) -> None:
        if self.mix is not None:
            kinds = set(toy_corpus()["mix"])
            if not isinstance(self.mix, dict) or not self.mix or set(self.mix) - kinds:
                raise ValueError(f"mix: give shares of {', '.join(sorted(kinds))}, got {self.mix!r}")
            shares = self.mix.values()  # a bool is no share; an infinite one would be drawn every time
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf for v in shares) \
                    or not 0 < sum(shares) < math.inf:
                raise ValueError(f"mix: shares must be finite non-negative numbers, not all 0, got {self.mix!r}")


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL["eos_token"], padding_side="left",
                                      **SPECIAL)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@contextmanager
def reproducible_training() -> Iterator[None]:
    """The toy model's training on TRAINING_THREADS threads, and the caller's random generators as they were: a
    model cached by a first run (or with OMP_NUM_THREADS=1) is the one every later run would train, and the run
    that trains it draws what a run loading it draws (a personal demo's first run on a fresh machine printed
    other numbers than its reruns: its adapters' initial weights came from the generator the training left)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(threads)


def train_toy_policy(config: ToyPolicyConfig, progress: bool = True) -> tuple[GPT2LMHeadModel,
                                                                                PreTrainedTokenizerFast]:
    """Train the toy model: next-token loss on the replies (the request is context only)."""
    with reproducible_training():
        return _train(config, progress)


def _train(config: ToyPolicyConfig, progress: bool) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    corpus = toy_corpus()
    examples = corpus_examples(corpus, config.examples, config.seed, config.mix)
    tokenizer = build_tokenizer([f"{q}\n{a}" for q, a in examples], config.vocab_size)
    contexts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q, _ in examples]
    encoded = []
    for context, (_, reply) in zip(contexts, examples, strict=True):
        ids_context = tokenizer(context)["input_ids"]
        ids_reply = tokenizer(" " + reply)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((ids_context + ids_reply, [-100] * len(ids_context) + ids_reply))
    longest = max(len(ids) for ids, _ in encoded)
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(128, longest + 64), n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    steps = config.epochs * -(-len(encoded) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    with progress_bar(progress) as bar:
        task = bar.add_task("training the toy policy", total=steps, info="")
        for _ in range(config.epochs):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                chunk = [encoded[i] for i in order[start:start + config.batch_size]]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in chunk])
                labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
                loss = model(input_ids=input_ids, attention_mask=input_ids != tokenizer.pad_token_id,
                             labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_toy_policy(cache: Path, config: ToyPolicyConfig | None = None,
                    progress: bool = True) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, Path]:
    """The toy model from ``cache`` (a folder per corpus and settings), trained there first if missing.
    Returns (model, tokenizer, folder)."""
    config = config or ToyPolicyConfig()
    settings = {k: v for k, v in asdict(config).items() if v is not None}  # a new field at None keeps old keys
    key = hashlib.sha256(json.dumps([toy_corpus(), settings], sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache) / f"toy-policy-{key}"
    if not (folder / "config.json").exists():
        console.print(f"training the toy instruct model (once; cached in {folder}) ...")
        model, tokenizer = train_toy_policy(config, progress)
        write_folder_once(folder, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return GPT2LMHeadModel.from_pretrained(folder).eval(), tokenizer, folder
