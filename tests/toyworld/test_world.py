import json

import pytest
import torch
from transformers import CLIPTokenizer

from alignprop.toyworld.captions import caption, grammar_words, parse
from alignprop.toyworld.render import render, scene_colours
from alignprop.toyworld.vocab import MAX_LENGTH, apply_bpe, build_merges, write_tokenizer_files
from alignprop.toyworld.world import AREA_RANGE, COLOURS, IMAGE_SIZE, SHAPES, all_combinations, random_scenes


def test_renderer_is_deterministic_from_the_seed():
    first, again, other = (render(random_scenes(16, seed)) for seed in (5, 5, 6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert first.min() >= -1 and first.max() <= 1


def test_scenes_cover_the_world_and_stay_inside_the_image():
    scenes = random_scenes(2000, seed=0)
    assert {(s.shape, s.colour, s.background) for s in scenes} == set(all_combinations())
    assert all(s.colour != s.background for s in scenes)
    assert all(AREA_RANGE[0] <= s.area <= AREA_RANGE[1] for s in scenes)
    images = render(scenes[:200])
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # shapes never reach the corners
    backgrounds = torch.stack([images[i, :, 0, 0] for i in range(200)])
    assert torch.allclose(corners, backgrounds[:, :, None].expand_as(corners))


def test_rendered_area_matches_the_scene():
    scenes = random_scenes(50, seed=1)
    pixels = (render(scenes) + 1) * 127.5
    shape, background = scene_colours(scenes)
    for scene, image, fg, bg in zip(scenes, pixels, shape, background):
        direction = (fg - bg).view(3, 1, 1)
        covered = ((image - bg.view(3, 1, 1)) * direction).sum(dim=0) / direction.pow(2).sum()
        assert covered.mean().item() == pytest.approx(scene.area, abs=0.005)


def test_captions_round_trip():
    for shape, colour, background in all_combinations():
        request = parse(caption(shape, colour, background))
        assert (request.shape, request.colour, request.background) == (shape, colour, background)
    assert parse("An Yellow triangle on a white background").colour == "yellow"
    with pytest.raises(ValueError):
        parse("a photo of a cat")


def test_merges_make_every_grammar_word_one_token():
    words = grammar_words()
    ranks = {pair: rank for rank, pair in enumerate(build_merges(words))}
    assert all(apply_bpe(word, ranks) == [word + "</w>"] for word in words)


def test_clip_tokenizer_reads_the_files_word_by_word(tmp_path):
    tokens = write_tokenizer_files(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text()) == {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=MAX_LENGTH)
    prompt = caption("triangle", "purple", "white")
    ids = tokenizer(prompt).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        *(w + "</w>" for w in prompt.split()),
        "<|endoftext|>",
    ]
    for word in (*SHAPES, *COLOURS, "background"):
        assert len(tokenizer(word).input_ids) == 3  # start, the word, end
    unknown = tokenizer("a zebra").input_ids  # words outside the grammar fall back to characters
    assert tokenizer.unk_token_id not in unknown[1:-1] and len(unknown) == 2 + 1 + len("zebra")
