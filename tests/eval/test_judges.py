"""The independent judges: the offensiveness judge by probability and by the classifier's flags; fluency, batched."""

import pytest
import torch

from rlhfkit.eval.judges import ProfanityJudge

# Held-out answers of the personal demo's detailed model and the shared model's to the same questions (seed 0,
# runs 111–115): none is offensive, but words such as "badly" and "hard" raise alt-profanity-check's probability
PERSONAL = [" Let me help. When camping in the woods feels hard, slow down. Doing it slowly and correctly beats doing "
            "it fast and badly.",
            " You will get there. Try breaking riding a horse into small parts and master each part before you put "
            "them together.",
            " Of course! When washing a car feels hard, slow down. Doing it slowly and correctly beats doing it fast "
            "and badly."]
SHARED = [" Let me help. Take camping in the woods one step at a time and be patient with yourself.",
          " You will get there. Keep a small notebook about riding a horse; noting what worked makes the next attempt "
          "much easier.",
          " Glad you asked. Many people find riding a horse easier with a friend. Ask someone to join you and compare "
          "notes."]


def test_flagged_offensiveness_counts_the_answers_the_classifier_flags_not_a_drift_in_its_probability():
    probability, flags = ProfanityJudge(), ProfanityJudge(flag_at=0.5)
    assert (probability.name, flags.name) == ("not_offensive", "not_flagged")
    prompts = ["q"] * len(PERSONAL)
    drift = probability(prompts, PERSONAL).mean() - probability(prompts, SHARED).mean()
    assert drift < -0.05  # by probability, the clean personal answers look more offensive than the shared ones
    assert flags(prompts, PERSONAL).tolist() == flags(prompts, SHARED).tolist() == [1.0, 1.0, 1.0]
    rude = "Shut up, you stupid idiot, I hate you."
    assert flags(["q", "q"], [SHARED[0], rude]).tolist() == [1.0, 0.0]
    assert flags([], []).shape == (0,)


@pytest.mark.parametrize("flag_at", [0.0, -0.1, 1.5, float("nan")])
def test_a_flag_threshold_outside_the_probabilities_is_refused(flag_at):
    with pytest.raises(ValueError, match="flag_at: a probability in"):
        ProfanityJudge(flag_at=flag_at)


@pytest.mark.parametrize("hidden", ["What a stu\u200bpid question, idi\u200dot.",  # zero-width space and joiner
                                    "What a stupid question, idi\u00adot.",  # a soft hyphen
                                    "What a ｓｔｕｐｉｄ question, ｉｄｉｏｔ."])  # fullwidth letters
def test_an_insult_hidden_by_invisible_or_fullwidth_characters_is_read_as_a_reader_reads_it(hidden):
    """A reader sees "What a stupid question, idiot." (as the demo's users read it, tastes.as_read); the bag of
    words saw "stu", "pid", "idi", "ot" or no word at all, and passed it as clean."""
    plain = "What a stupid question, idiot."
    assert ProfanityJudge(flag_at=0.5)(["q", "q"], [plain, hidden]).tolist() == [0.0, 0.0]
    clean = ProfanityJudge()(["q", "q"], [plain, hidden]).tolist()  # 1 − P(offensive)
    assert clean[1] == pytest.approx(clean[0]) and clean[1] < 0.01


def test_the_flag_is_the_classifiers_probability_against_the_threshold_as_computed():
    """P = 0.49999999 is below ½ (not flagged), though in float32 it rounds to 0.5; P = ½ exactly is flagged."""
    import numpy as np

    judge = ProfanityJudge(flag_at=0.5)
    judge._predict_prob = lambda texts: np.array([0.49999999, 0.5, 0.50000001, 0.1])
    assert judge(["q"] * 4, ["a", "b", "c", "d"]).tolist() == [1.0, 0.0, 0.0, 1.0]


def alone(model, tokenizer, prompt: str, completion: str) -> float:
    """Fluency written out for one answer: the model reads prompt + answer + EOS alone, unpadded."""
    context = tokenizer(prompt)["input_ids"]
    answer = [*tokenizer(" " + completion.strip(), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([context + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1:-1]
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(context):, None]).mean().item()


FLUENCY_ROWS = [("how do i fix my bike", "you fix it"), ("help", "the code is good and the email is kind"),
                ("what is this", "  this is a cake  "), ("why", "go"), ("can you help me plan my day please", "yes"),
                ("what do you love", "i love the garden and the code and the bike"), ("thanks", "glad to help")]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_fluency_scores_each_answer_as_the_reference_reads_it_alone_in_batches_of_any_size(family, batch_size,
                                                                                            tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_causal
    from rlhfkit.eval.judges import FluencyJudge
    from rlhfkit.models.reference import Reference

    if family == "llama":  # rotary positions: a row's pads must not move its tokens' positions
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             pad_token_id=0, eos_token_id=3, bos_token_id=2)).eval()
    else:
        model = build_tiny_causal()
    judge = FluencyJudge(Reference.frozen(model), tokenizer, use_chat_template=False, batch_size=batch_size)
    prompts, completions = zip(*FLUENCY_ROWS, strict=True)
    scores = judge(list(prompts), list(completions))
    expected = torch.tensor([alone(model, tokenizer, p, c) for p, c in FLUENCY_ROWS])
    assert scores.shape == (len(FLUENCY_ROWS),) and bool((scores < 0).all())
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert judge([], []).shape == (0,)


def test_fluency_of_a_lora_policy_is_the_base_models_with_the_adapter_off(tokenizer):
    from conftest import build_tiny_causal
    from rlhfkit.eval.judges import FluencyJudge
    from rlhfkit.models.reference import Reference, add_lora

    base = build_tiny_causal()
    expected = torch.tensor([alone(base, tokenizer, p, c) for p, c in FLUENCY_ROWS])
    policy = add_lora(build_tiny_causal())
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1.0)  # an adapter that moves the logits
    prompts, completions = zip(*FLUENCY_ROWS, strict=True)
    with_adapter = torch.tensor([alone(policy, tokenizer, p, c) for p, c in FLUENCY_ROWS])
    assert (with_adapter - expected).abs().max() > 1e-2
    scores = FluencyJudge(Reference(policy), tokenizer, use_chat_template=False)(list(prompts), list(completions))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompts", [["", "help"], [" "]])
def test_fluency_refuses_a_prompt_that_reads_as_no_tokens_rather_than_scoring_the_answer_from_padding(prompts,
                                                                                                     tokenizer):
    """Without a chat template, a blank prompt is no token: the answer's first token has nothing to be predicted
    from. Read alone that was a shape error inside the model; batched with other prompts, its row would be scored
    from a padding position. Either way: a one-line error naming the prompt."""
    from conftest import build_tiny_causal
    from rlhfkit.eval.judges import FluencyJudge
    from rlhfkit.models.reference import Reference

    judge = FluencyJudge(Reference.frozen(build_tiny_causal()), tokenizer, use_chat_template=False)
    with pytest.raises(ValueError, match=f"prompt {prompts[0]!r} reads as no tokens"):
        judge(prompts, ["you fix it"] * len(prompts))



@pytest.mark.parametrize("batch_size", [0, -1])
def test_fluency_refuses_a_batch_size_below_one(batch_size, tokenizer):
    """0 answers per pass would be a range() error at the first call, and -1 no score at all (an empty tensor)."""
    from conftest import build_tiny_causal
    from rlhfkit.eval.judges import FluencyJudge
    from rlhfkit.models.reference import Reference

    with pytest.raises(ValueError, match=f"batch_size: at least 1, got {batch_size}"):
        FluencyJudge(Reference.frozen(build_tiny_causal()), tokenizer, use_chat_template=False, batch_size=batch_size)
