import pytest

from alignprop import prompts
from alignprop.errors import UserError
from alignprop.prompts import load_prompts

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
    "lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck "
    "goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()
EVAL_SIMPLE_ANIMALS = "snail hippopotamus cheetah crocodile lobster octopus".split()


def test_builtin_sets_are_the_papers():
    assert load_prompts("simple_animals") == SIMPLE_ANIMALS
    assert load_prompts("eval_simple_animals") == EVAL_SIMPLE_ANIMALS
    assert not set(SIMPLE_ANIMALS) & set(EVAL_SIMPLE_ANIMALS)


def test_any_text_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("  a red car \n\nan old boat\n")
    assert load_prompts(str(path)) == ["a red car", "an old boat"]
    assert load_prompts(f"from_file:{path}") == ["a red car", "an old boat"]


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match=r"does not exist"):
        load_prompts(f"from_file:{tmp_path / 'absent'}")
    with pytest.raises(UserError, match=r"unknown prompt set 'animals'.*hps_v2_all.*from_file:PATH"):
        load_prompts("animals")


def test_hps_sets_ship_with_the_original_counts():
    """The original's files, read from assets/ (no download): 750 training captions (the 2 blank lines skipped)
    and 50 evaluation captions, none of them shared."""
    train, evaluation = load_prompts("hps_v2_all"), load_prompts("eval_hps_v2_all")
    assert (len(train), len(evaluation)) == (750, 50)
    assert train[0] == prompts.BUILTIN["hps_v2_all"].read_text(encoding="utf-8").splitlines()[0].strip()
    assert not set(train) & set(evaluation)
