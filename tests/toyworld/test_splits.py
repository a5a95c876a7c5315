from alignprop.prompts import load_prompts
from alignprop.toyworld.captions import parse
from alignprop.toyworld.splits import HELD_OUT_PAIRS, prompt_file, split_captions


def test_held_out_pairs_never_appear_in_training_captions():
    splits = split_captions()
    assert len(splits["train"]) == 60 and len(splits["heldout"]) == 30
    train_pairs = {(parse(c).shape, parse(c).colour) for c in splits["train"]}
    heldout_pairs = {(parse(c).shape, parse(c).colour) for c in splits["heldout"]}
    assert heldout_pairs == set(HELD_OUT_PAIRS) and not train_pairs & heldout_pairs


def test_shipped_prompt_files_match_the_split_and_load_as_prompt_sets():
    for split, captions in split_captions().items():
        assert load_prompts(str(prompt_file(split))) == captions
        assert load_prompts(f"toyworld_{split}") == captions  # the named prompt sets
