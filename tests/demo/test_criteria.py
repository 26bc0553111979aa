from rlhfkit.demo.criteria import NotToxicOnTopic, instructions, on_topic


def test_labelers_hidden_criterion_prefers_kind_on_topic_replies():
    quality = NotToxicOnTopic(["stupid", "idiot"])
    prompt = "Any tips for baking bread?"
    scores = quality([prompt] * 5, ["For baking bread, be patient.", "Thank you! Have a nice day.",
                                    "For baking cookies, be patient.", "Baking bread? Stupid idiot.",
                                    "Great question! For training a puppy, start small."])
    assert scores.tolist() == [1.0, 0.0, 0.5, -1.0, 0.0]  # the wrong topic is no better than a pleasantry
    assert on_topic("What should I do?", "anything") == 1.0  # no content words: nothing to miss
    assert quality.higher_is_better and not quality.independent


def test_labelers_are_told_that_off_topic_answers_rank_low():
    text = instructions("not toxic, still on topic")
    assert "not toxic, still on topic" in text and "another topic" in text


def test_the_smollm2_gold_ranks_as_the_instructions_say_topic_first_rude_last():
    """On-topic answers that are not rude rank above any answer on another topic or a pleasantry, however
    cheerful; a rude answer ranks last, however on topic; kindness orders the rest."""
    from rlhfkit.demo.criteria import KindPositiveOnTopic

    prompt = "Any tips for baking bread?"
    answers = ["Baking bread is wonderful! Be patient, it is so rewarding and fun.",  # on topic, kind
               "For baking bread, weigh the flour.",  # on topic, plain
               "Thank you so much! Have a wonderful, happy, lovely day!",  # a cheerful pleasantry
               "Great question! Training a puppy is wonderful, start small.",  # cheerful, another topic
               "Baking bread? You stupid idiot, just buy it."]  # on topic, rude
    scores = KindPositiveOnTopic()([prompt] * len(answers), answers).tolist()
    assert scores[0] > scores[1] > max(scores[2], scores[3]) > scores[4], scores
