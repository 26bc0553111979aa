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


def test_completion_logits_run_the_lm_head_on_the_completions_positions_only_with_the_same_logits():
    """The LM head reads only the positions that predict completion tokens (transformers' logits_to_keep), for a
    plain and a LoRA model; the logits and the last hidden states are those of the full forward."""
    import torch

    from conftest import build_tiny_causal
    from rlhfkit.models.policy import completion_logits, takes_logits_to_keep
    from rlhfkit.models.reference import add_lora

    tokenizer = word_tokenizer()
    batch = tokenize_completions(tokenizer, ["how do i fix my bike", "help"], ["you fix it", "the code is good"],
                                 True, max_prompt_tokens=8, max_completion_tokens=6)
    rows = []
    for model in (build_tiny_causal(), add_lora(build_tiny_causal())):
        assert takes_logits_to_keep(model)
        rows.clear()
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[1]))
        logits, hidden = completion_logits(model, batch, output_hidden=True)
        hook.remove()
        assert rows == [batch.completion_ids.shape[1] + 1]  # and the last position, which predicts nothing
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
        full = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     output_hidden_states=True)
        start = batch.prompt_ids.shape[1] - 1
        torch.testing.assert_close(logits, full.logits[:, start:-1])
        torch.testing.assert_close(hidden, full.hidden_states[-1][:, start:-1])
