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


@pytest.fixture
def hps_sources(tmp_path, monkeypatch):
    """Empty assets and cache directories, and a 'remote' directory served through file:// URLs."""
    assets, cache, remote = tmp_path / "assets", tmp_path / "cache", tmp_path / "remote"
    for directory in (assets, remote):
        directory.mkdir()
    monkeypatch.setattr(prompts, "ASSETS", assets)
    monkeypatch.setenv("ALIGNPROP_CACHE", str(cache))
    monkeypatch.setattr(prompts, "HPS_PROMPTS_URL", remote.as_uri())
    return assets, cache / "prompts", remote


def test_hps_sets_are_fetched_once_then_cached(hps_sources):
    _, cache, remote = hps_sources
    (remote / "hps_v2_all.txt").write_text("A passenger jet on a runway.\nA dog in a doorway.\n")
    (remote / "hps_v2_all_eval.txt").write_text("A bus on a road.\n")
    assert load_prompts("hps_v2_all") == ["A passenger jet on a runway.", "A dog in a doorway."]
    assert load_prompts("eval_hps_v2_all") == ["A bus on a road."]
    for name in ("hps_v2_all.txt", "hps_v2_all_eval.txt"):
        (remote / name).unlink()
    assert (cache / "hps_v2_all.txt").is_file()
    assert load_prompts("hps_v2_all") == ["A passenger jet on a runway.", "A dog in a doorway."]


def test_hps_file_saved_in_assets_is_used(hps_sources):
    assets, _, _ = hps_sources
    (assets / "hps_v2_all.txt").write_text("a lighthouse at dusk\n")
    assert load_prompts("hps_v2_all") == ["a lighthouse at dusk"]


def test_hps_offline_says_how_to_supply_the_file(hps_sources):
    with pytest.raises(UserError) as error:
        load_prompts("eval_hps_v2_all")
    message = str(error.value)
    assert "\n" not in message
    assert "not available offline" in message and "hps_v2_all_eval.txt" in message
    assert "pass its path as prompt_fn / eval_prompt_fn" in message


def test_a_downloaded_error_page_is_not_cached(hps_sources):
    _, cache, remote = hps_sources
    (remote / "hps_v2_all.txt").write_text("<!DOCTYPE html><html>rate limited</html>")
    with pytest.raises(UserError, match=r"not a prompt list"):
        load_prompts("hps_v2_all")
    assert not (cache / "hps_v2_all.txt").exists()
