from conftest import build_tiny_seq2seq, word_tokenizer
from rlhfkit.models.policy import prepare_tokenizer, tokenize_completions


def test_a_whole_completion_ends_with_eos_and_a_cut_one_does_not():
    """A completion cut at max_completion_tokens must not teach the model to stop at the cut."""
    tokenizer = word_tokenizer()
    batch = tokenize_completions(tokenizer, ["how do i", "fix bike"], ["happy to help", "you are doing great today"],
                                 True, max_prompt_tokens=8, max_completion_tokens=4)
    eos = tokenizer.eos_token_id
    whole, cut = batch.completion_ids.tolist()
    assert whole == [*tokenizer("happy to help", add_special_tokens=False)["input_ids"], eos]
    assert cut == tokenizer("you are doing great", add_special_tokens=False)["input_ids"] and eos not in cut
    assert batch.completion_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_prompts_keep_their_end_and_are_padded_on_the_tokenizer_side():
    tokenizer = word_tokenizer()  # left padding
    batch = tokenize_completions(tokenizer, ["how do i fix bike", "help"], ["ok", "ok"], False, max_prompt_tokens=3,
                                 max_completion_tokens=8)
    assert tokenizer.batch_decode(batch.prompt_ids, skip_special_tokens=True) == ["i fix bike", "help"]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_seq2seq_prompts_are_not_shortened_for_the_completion():
    model = build_tiny_seq2seq()
    tokenizer = prepare_tokenizer(word_tokenizer(), model)
    batch = tokenize_completions(tokenizer, ["how do i fix bike"], ["ok"], False, 8, 8, model)
    assert batch.prompt_mask.sum().item() == 5
