import pytest
import torch

from conftest import build_tiny_reward_backbone, minilm_tokenizer
from rlhfkit.eval.judges import ProfanityJudge, SentimentJudge
from rlhfkit.reward import ClassifierReward, FunctionReward, RewardFn


def hate_classifier():
    return build_tiny_reward_backbone(num_labels=2, id2label={0: "hate", 1: "nothate"},
                                      label2id={"hate": 0, "nothate": 1}).eval()


def test_classifier_reward_is_the_named_labels_logit_or_probability():
    model, tokenizer = hate_classifier(), minilm_tokenizer()
    texts = ["you are kind", "you are an idiot", "hello"]
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    reward = ClassifierReward(model, tokenizer, label="nothate", batch_size=2)
    assert isinstance(reward, RewardFn)
    assert torch.allclose(reward(["q"] * 3, texts), logits[:, 1], atol=1e-5)
    probability = ClassifierReward(model, tokenizer, label="nothate", output="probability")(["q"] * 3, texts)
    assert torch.allclose(probability, logits.softmax(-1)[:, 1], atol=1e-5)


def test_classifier_reward_from_pretrained_folder(tmp_path):
    hate_classifier().save_pretrained(tmp_path)
    minilm_tokenizer().save_pretrained(tmp_path)
    assert ClassifierReward.from_pretrained(tmp_path, label=0)(["q"], ["text"]).shape == (1,)


def test_unknown_label_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'toxic' is not one of the classifier's labels \['hate', 'nothate'\]"):
        ClassifierReward(hate_classifier(), minilm_tokenizer(), label="toxic")


def test_function_reward_per_item_and_batched():
    per_item = FunctionReward(lambda prompt, completion: len(completion))
    assert per_item(["a", "b"], ["xy", "xyz"]).tolist() == [2.0, 3.0]
    batched = FunctionReward(lambda ps, cs: [c.count("!") for c in cs], batched=True)
    assert batched(["a"], ["hi!!"]).tolist() == [2.0]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        FunctionReward(lambda ps, cs: [1], batched=True)(["a", "b"], ["x", "y"])


def test_judges_prefer_kind_to_rude():
    kind, rude = "Thank you, that is a lovely idea, happy to help!", "Shut up, you stupid idiot, I hate you."
    for judge in (ProfanityJudge(), SentimentJudge()):
        clean, offensive = judge(["q", "q"], [kind, rude]).tolist()
        assert clean > offensive
    assert ProfanityJudge()([], []).shape == (0,)
