import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from imagen.data.shapes import (
    POSITIONS,
    Scene,
    SceneSampler,
    ShapeObject,
    ShapesConfig,
    matches_caption,
    render,
    scene_from_targets,
    scene_targets,
)
from imagen.data.shapes_datamodule import render_split, sample_scenes

HELDOUT = [{"color": "red", "shape": "triangle"}, {"color": "blue", "shape": "circle"}]


def build_split(config, split, num_seen, num_heldout, seed, heldout_in_train=False):
    return render_split(
        config, split, *sample_scenes(config, split, num_seen, num_heldout, seed, heldout_in_train)
    )


def test_render_is_deterministic_for_a_seed():
    config = ShapesConfig(heldout=HELDOUT)
    a = build_split(config, "train", 64, 0, seed=3)
    b = build_split(config, "train", 64, 0, seed=3)
    c = build_split(config, "train", 64, 0, seed=4)
    assert np.array_equal(a.images, b.images) and a.scenes == b.scenes
    assert not np.array_equal(a.images, c.images)


def test_heldout_combinations_never_appear_in_training():
    config = ShapesConfig(heldout=HELDOUT)
    train = build_split(config, "train", 3000, 0, seed=0)
    objects = [o for s in train.scenes for o in s.objects]
    assert not any(config.is_heldout(o) for o in objects)
    # the rest of the attribute space is covered: every color and every shape appears
    assert {o.color for o in objects} == set(config.colors) and {o.shape for o in objects} == set(
        config.shapes
    )
    # an image-only stage (the autoencoder) may ask for them in its training images
    images_only = build_split(config, "train", 3000, 0, seed=0, heldout_in_train=True)
    assert 0.05 < images_only.heldout.mean() < 0.5
    test = build_split(config, "test", 100, 50, seed=0)
    assert test.heldout.sum() == 50
    assert all(
        any(config.is_heldout(o) for o in s.objects)
        for s, h in zip(test.scenes, test.heldout, strict=True)
        if h
    )


def test_scene_attributes_and_captions():
    config = ShapesConfig()
    rng = np.random.default_rng(0)
    sampler = SceneSampler(config)
    scenes = [sampler.sample(rng) for _ in range(400)]
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2}
    for s in scenes:
        caps = s.captions()
        assert len(caps) >= 3 and len(set(caps)) == len(caps)
        for o in s.objects:
            assert o.color in caps[0] and o.shape in caps[0] and o.size in caps[0]
        if len(s.objects) == 2:
            assert s.relation in caps[0]
        assert scene_from_targets(scene_targets(s, config), config) == sorted(
            s.objects, key=lambda o: POSITIONS.index(o.position)
        )
    assert render(scenes[0], config, rng).shape == (32, 32, 3)


def test_caption_matching_rules():
    a = ShapeObject("red", "circle", "small", "left")
    b = ShapeObject("blue", "square", "large", "right")
    scene = Scene((a, b), "left of")
    assert matches_caption([a, b], scene) and matches_caption([b, a], scene)
    # the relation is what counts for two objects, not the exact cells
    assert matches_caption(
        [ShapeObject("red", "circle", "small", "top left"), ShapeObject("blue", "square", "large", "top")],
        scene,
    )
    assert not matches_caption(
        [ShapeObject("red", "circle", "small", "right"), ShapeObject("blue", "square", "large", "left")],
        scene,
    )
    assert not matches_caption([a], scene)
    assert matches_caption([a], Scene((a,)))
    assert not matches_caption([ShapeObject("red", "circle", "large", "left")], Scene((a,)))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"colors": ["red", "magenta"]}, "data.colors"),
        ({"shapes": []}, "data.shapes"),
        ({"max_objects": 3}, "data.max_objects"),
        ({"heldout": [{"color": "black"}]}, "data.heldout"),
    ],
)
def test_bad_renderer_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ShapesConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heldout": ["red"]}, "data.heldout: the entry 'red' is not an attribute combination"),
        ({"heldout": {"color": "red"}}, "data.heldout must be a list of attribute combinations"),
        ({"heldout": "red"}, "data.heldout must be a list of attribute combinations"),
        ({"size_jitter": 3}, "data.size_jitter must be a number in [0, 1)"),
        ({"size_jitter": 1.0}, "data.size_jitter must be a number in [0, 1)"),
        ({"size_jitter": -0.5}, "data.size_jitter must be a number in [0, 1)"),
        ({"size_jitter": "0.1"}, "data.size_jitter must be a number in [0, 1)"),
        ({"supersample": 0}, "data.supersample must be an integer >= 1"),
        ({"supersample": 2.5}, "data.supersample must be an integer >= 1"),
        ({"supersample": "4"}, "data.supersample must be an integer >= 1"),
        ({"background": [0, 0]}, "data.background must be three integers in [0, 255]"),
        ({"background": [300, 0, 0]}, "data.background must be three integers in [0, 255]"),
        ({"background": [-1, 0, 0]}, "data.background must be three integers in [0, 255]"),
        ({"background": [0.5, 0, 0]}, "data.background must be three integers in [0, 255]"),
        ({"background": 0}, "data.background must be three integers in [0, 255]"),
        ({"background": "red"}, "data.background must be three integers in [0, 255]"),
        ({"image_size": "32"}, "data.image_size must be an integer >= 16"),
        ({"image_size": 8}, "data.image_size must be an integer >= 16"),
        ({"jitter": "1"}, "data.jitter must be a whole number of pixels >= 0"),
        ({"jitter": 6}, "data.jitter=6 moves an object's center out of its grid cell"),
        ({"two_object_prob": "0.5"}, "data.two_object_prob must be a number in [0, 1]"),
    ],
)
def test_bad_renderer_values_are_refused_with_the_key(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShapesConfig(**kwargs)


def test_renderer_settings_at_their_limits_are_accepted():
    config = ShapesConfig(size_jitter=0.9, supersample=1, background=[255, 255, 255], jitter=5, heldout=None)
    assert config.background == (255, 255, 255) and config.heldout == []
    scene = SceneSampler(config).sample(np.random.default_rng(0))
    assert render(scene, config, np.random.default_rng(0)).shape == (32, 32, 3)


def test_binding_pairs_swap_the_attributes_of_two_objects_in_place():
    from imagen.data.shapes_datamodule import ShapesDataModule
    from imagen.metrics.judge import render_batch

    # jitter 0: the render does not depend on the seed, so the expected images below can be drawn with any
    dm = ShapesDataModule(num_train=8, num_val=64, num_val_heldout=0, use_judge=False, jitter=0)
    captions, images, swapped = dm.binding_pairs("val", limit=5)
    assert len(captions) == 5 and images.shape == swapped.shape == (5, 3, 32, 32)
    prompts, scenes, _ = dm.eval_prompts("val")
    rows = [
        i
        for i, s in enumerate(scenes)
        if len(s.objects) == 2 and s.objects[0].describe() != s.objects[1].describe()
    ]
    # the first two-object prompts whose objects look different
    assert captions == [prompts[i] for i in rows[:5]]
    for i, image, other in zip(rows[:5], images, swapped, strict=True):
        a, b = scenes[i].objects
        exchanged = Scene((replace(a, color=b.color, shape=b.shape, size=b.size),
                           replace(b, color=a.color, shape=a.shape, size=a.size)), scenes[i].relation)  # fmt: skip
        assert torch.equal(image, render_batch(dm.config, [scenes[i]], np.random.default_rng(0))[0])
        assert torch.equal(other, render_batch(dm.config, [exchanged], np.random.default_rng(0))[0])
        assert not torch.equal(image, other)
    assert dm.binding_pairs("val", limit=0)[0] == []
    one_object = ShapesDataModule(num_train=8, num_val=16, num_val_heldout=0, use_judge=False, max_objects=1)
    assert one_object.binding_pairs("val")[1].shape == (0, 3, 32, 32)


def test_attributes_swapped_exchanges_the_looks_of_two_objects_in_place():
    a = ShapeObject("red", "circle", "small", "left")
    b = ShapeObject("blue", "square", "large", "right")
    swapped = Scene((a, b), "left of").attributes_swapped()
    assert swapped == Scene(
        (ShapeObject("blue", "square", "large", "left"), ShapeObject("red", "circle", "small", "right")),
        "left of",
    )
    assert swapped.captions()[0] == "a large blue square left of a small red circle"
    assert Scene((a,)).attributes_swapped() is None
    # they look the same
    assert Scene((a, replace(a, position="right")), "left of").attributes_swapped() is None


def test_hard_negative_captions_reuse_the_words_and_are_false_of_the_image():
    from imagen.data.shapes_datamodule import ShapesDataModule, ShapesDataset
    from imagen.metrics.captions import parse_shapes_caption

    dm = ShapesDataModule(num_train=200, num_val=8, num_val_heldout=0, use_judge=False, hard_negatives=True)
    dm.setup("fit")
    dataset = ShapesDataset(dm.split("train"), dm.config)
    kinds = set()
    for index in range(200):
        item = dataset[(index, 11)]
        scene, negative = dm.split("train").scenes[index], parse_shapes_caption(item["negative_caption"])
        assert negative is not None and not matches_caption(list(scene.objects), negative), item
        assert dataset[(index, 11)]["negative_caption"] == item["negative_caption"]  # fixed by the item seed
        if len(scene.objects) == 1:  # the same object, moved or resized: no color-shape pair the scene lacks
            (obj,), (neg,) = scene.objects, negative.objects
            assert (obj.color, obj.shape) == (neg.color, neg.shape)
            kinds.add("moved" if obj.position != neg.position else "resized")
        elif scene.objects[0].describe() != scene.objects[1].describe():
            assert sorted(o.describe() for o in negative.objects) == sorted(
                o.describe() for o in scene.objects
            )
            kinds.add("swapped")
    assert kinds == {"moved", "resized", "swapped"}
    # off by default, and never on evaluation items
    assert "negative_caption" not in ShapesDataset(dm.split("train"))[0]
    assert "negative_caption" not in next(iter(dm.val_dataloader()))
    twins = Scene((ShapeObject("red", "circle", "small", "left"), ShapeObject("red", "circle", "small", "right")),
                  "left of")  # fmt: skip
    assert twins.hard_negative(np.random.default_rng(0), POSITIONS, ["small", "large"]) is None


@pytest.mark.parametrize(
    "heldout", [[{"color": "red", "size": "large"}], [{"shape": "circle", "position": "left"}]]
)
def test_hard_negatives_never_name_a_held_out_composition(heldout):
    # resized or moved (or two objects swapping looks), a training scene's negative could show a held-out composition
    from imagen.data.shapes_datamodule import ShapesDataModule
    from imagen.metrics.captions import parse_shapes_caption

    dm = ShapesDataModule(heldout=heldout, num_train=600, num_val=4, num_val_heldout=4, num_test=4,
                          num_test_heldout=4, use_judge=False, hard_negatives=True)  # fmt: skip
    dataset, scenes = dm.train_dataloader().dataset, dm.split("train").scenes
    for index in range(len(dataset)):
        for seed in range(2):
            negative = parse_shapes_caption(dataset[(index, seed)]["negative_caption"])
            assert dm.scene_group(negative) == "seen", (scenes[index].captions()[0], negative.captions()[0])
            assert not matches_caption(list(scenes[index].objects), negative)
    small_red, sizes = Scene((ShapeObject("red", "circle", "small", "left"),)), ["small", "large"]
    not_large = lambda scene: scene.objects[0].size != "large"  # noqa: E731
    for seed in range(10):  # only moved: resized, it would be a large red circle
        negative = small_red.hard_negative(np.random.default_rng(seed), POSITIONS, sizes, not_large)
        assert negative.objects[0].size == "small" and negative.objects[0].position != "left"
    assert small_red.hard_negative(np.random.default_rng(0), ["left"], sizes, not_large) is None


def test_the_negative_of_look_alike_objects_is_another_scene_false_of_the_image():
    # two objects that look the same have no swapped negative: the negative is another training scene's caption,
    # never that of one of its repeats (new_repeats) or of a look-alike (the same objects in the same relation)
    from imagen.data.shapes_datamodule import ShapesDataset

    small = ShapeObject("red", "circle", "small", "left")
    twins = Scene((small, replace(small, position="center")), "left of")
    look_alike = Scene((replace(small, position="bottom left"), replace(small, position="bottom")), "left of")
    other = Scene((ShapeObject("blue", "square", "large", "top"),))
    config = ShapesConfig(jitter=0)
    split = render_split(config, "train", [twins, twins, twins, look_alike, other], np.random.default_rng(0))
    dataset = ShapesDataset(split, hard_negatives=config)
    for seed in range(20):
        assert dataset[(0, seed)]["negative_caption"] in other.captions()
    alone = render_split(config, "train", [twins, look_alike], np.random.default_rng(0))
    with pytest.raises(ValueError, match="data.hard_negatives: every one of the 2 training scenes shows"):
        ShapesDataset(alone, hard_negatives=config)[(0, 0)]


def test_train_two_object_prob_changes_the_training_split_only():
    from imagen.data.shapes_datamodule import ShapesDataModule

    sizes = dict(num_train=2000, num_val=400, num_val_heldout=0, use_judge=False)
    base = ShapesDataModule(**sizes)
    more = ShapesDataModule(**sizes, train_two_object_prob=0.9)

    def two_object_share(dm, split):
        return np.mean([len(s.objects) == 2 for s in dm.split(split).scenes])

    assert abs(two_object_share(base, "train") - 0.5) < 0.05
    assert abs(two_object_share(more, "train") - 0.9) < 0.03
    # validation (and test) keep the configured distribution: the very same scenes
    assert more.split("val").scenes == base.split("val").scenes
    with pytest.raises(ValueError, match="data.train_two_object_prob"):
        ShapesDataModule(train_two_object_prob=1.5)


@pytest.mark.parametrize("new_concept", [False, True])
def test_train_captions_without_the_rendered_split_are_the_split_s_captions(new_concept):
    # a test of a checkpoint fits its tokenizer from the training captions before the checkpoint replaces it: the
    # scenes are sampled again, not rendered, and give the same captions as the rendered split
    from imagen.data.shapes_datamodule import NewConceptShapesDataModule, ShapesDataModule

    sizes = dict(num_train=300, num_val=8, num_val_heldout=0, use_judge=False, train_two_object_prob=0.75)
    if new_concept:  # new_repeats 1: the rendered split holds each scene once
        colors = ["red", "green", "blue", "yellow", "purple", "cyan", "orange"]
        dm = NewConceptShapesDataModule(
            new_concept=[{"color": "orange"}], num_replay=100, colors=colors, **sizes
        )
    else:
        dm = ShapesDataModule(**sizes)
    sampled = dm.train_captions()
    assert "train" not in dm.splits
    dm.setup("fit")
    rendered = dm.train_captions()
    assert sampled == rendered and len(rendered) == sum(len(c) for c in dm.split("train").captions) > 300


def test_hflip_items_show_the_mirrored_scene_with_its_caption():
    from imagen.data.shapes_datamodule import ShapesDataModule, ShapesDataset

    scene = Scene(
        (
            ShapeObject("red", "triangle", "small", "top left"),
            ShapeObject("blue", "square", "large", "right"),
        ),
        "left of",
    )
    assert scene.mirrored() == Scene(
        (
            ShapeObject("red", "triangle", "small", "top right"),
            ShapeObject("blue", "square", "large", "left"),
        ),
        "right of",
    )
    config = ShapesConfig(jitter=0, colors=["red", "green", "blue"])
    split = render_split(config, "train", [scene, scene.mirrored()], np.random.default_rng(0))
    dataset = ShapesDataset(split, hard_negatives=config, hflip=True)
    mirrored = [dataset[(0, seed)] for seed in range(40) if ShapesDataset._mirror(0, seed)]
    assert 10 < len(mirrored) < 30
    # a flipped image is the render of the mirrored scene (but for a few anti-aliased edge pixels), as are its labels
    rendered = ShapesDataset(split)[1]["image"]
    for item in mirrored:
        difference = item["image"] - rendered
        assert difference.abs().mean() < 0.01 and (difference != 0).float().mean() < 0.02
        assert torch.equal(item["target"], torch.from_numpy(split.targets[1]))
        assert item["caption"] in scene.mirrored().captions()
        assert item["negative_caption"] not in scene.mirrored().captions()
    with pytest.raises(ValueError, match=r"data.train_hflip=true .* \['left'\]"):
        ShapesDataModule(positions=["left", "center"], train_hflip=True, use_judge=False)


@pytest.mark.parametrize("new_concept", [False, True])
def test_hflip_never_mirrors_a_sample_into_another_prompt_group(new_concept):
    # mirrored, a training "red at right" would be the held-out "red at left" (or a replayed "orange at right" the
    # new concept "orange at left")
    from imagen.data.shapes_datamodule import NewConceptShapesDataModule, ShapesDataModule

    sizes = dict(num_train=300, num_val=4, num_val_heldout=4, num_test=4, num_test_heldout=4, use_judge=False,
                 train_hflip=True)  # fmt: skip
    if new_concept:
        colors = ["red", "green", "blue", "yellow", "purple", "cyan", "orange"]
        concept = [{"color": "orange", "position": "left"}]
        dm = NewConceptShapesDataModule(new_concept=concept, num_replay=300, colors=colors, **sizes)
    else:
        dm = ShapesDataModule(heldout=[{"color": "red", "position": "left"}], **sizes)
    dataset, split = dm.train_dataloader().dataset, dm.split("train")
    mirrored = 0
    for index in range(len(dataset)):
        for seed in range(2):
            item = dataset[(index, seed)]
            shown = Scene(tuple(scene_from_targets(item["target"].numpy(), dm.config)))
            assert dm.scene_group(shown) == dm.scene_group(split.scenes[index]), item["caption"]
            mirrored += item["caption"] not in split.captions[index]
    assert mirrored > len(dataset) / 4  # the others are still mirrored (half of their items)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_train": 0}, "data.num_train=0: the train split needs at least one scene"),
        (
            {"num_val": 0, "num_val_heldout": 0, "heldout": HELDOUT},
            r"data.num_val=0 \+ data.num_val_heldout=0",
        ),
        ({"num_val": 0}, "data.num_val=0: the val split"),  # num_val_heldout counts only with data.heldout
        ({"num_test": -1, "heldout": HELDOUT}, "data.num_test=-1 .*: each must be >= 0"),
        ({"colors": []}, r"data.colors: unknown or empty \[\]"),
    ],
)
def test_bad_datamodule_settings_name_the_key(kwargs, message):
    from imagen.data.shapes_datamodule import ShapesDataModule

    with pytest.raises(ValueError, match=message):
        ShapesDataModule(use_judge=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heldout": ["red"]}, "data.heldout: the entry 'red' is not an attribute combination"),
        ({"heldout": ["red"]}, "e.g. data.heldout='[{color: red, shape: triangle}]'"),
        ({"background": [0, 0]}, "data.background must be three integers in [0, 255]"),
        ({"background": 5}, "data.background must be three integers in [0, 255]"),
        ({"supersample": 0}, "data.supersample must be an integer >= 1"),
        ({"size_jitter": 3}, "data.size_jitter must be a number in [0, 1)"),
        ({"num_train": "100"}, "data.num_train must be an integer (a number of scenes), got '100'"),
        ({"num_val": "10"}, "data.num_val must be an integer"),
        ({"num_test": 1.5}, "data.num_test must be an integer"),
        ({"num_val_heldout": "x", "heldout": HELDOUT}, "data.num_val_heldout must be an integer"),
        ({"train_two_object_prob": "0.9"}, "data.train_two_object_prob (or null) must be a number in [0, 1]"),
        ({"train_two_object_prob": 1.5}, "data.train_two_object_prob (or null) must be a number in [0, 1]"),
        ({"batch_size": 0}, "data.batch_size must be an integer >= 1"),
        ({"eval_batch_size": "64"}, "data.eval_batch_size must be an integer >= 1"),
        ({"judge_steps": 0}, "data.judge_steps must be an integer >= 1"),
        ({"seed": -1}, "data.seed must be an integer >= 0"),
        ({"num_workers": "2"}, "data.num_workers must be an integer >= 0"),
        ({"train_hflip": "no"}, "data.train_hflip must be true or false"),
        ({"hard_negatives": "yes"}, "data.hard_negatives must be true or false"),
        ({"heldout_in_train": 1}, "data.heldout_in_train must be true or false"),
    ],
)
def test_bad_datamodule_values_are_refused_with_the_key(kwargs, message):
    from imagen.data.shapes_datamodule import ShapesDataModule

    with pytest.raises(ValueError, match=re.escape(message)):
        ShapesDataModule(use_judge=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"new_concept": ["orange"]}, "data.new_concept: the entry 'orange' is not an attribute combination"),
        ({"new_concept": {"color": "orange"}}, "data.new_concept must be a list of attribute combinations"),
        ({"new_repeats": "8"}, "data.new_repeats must be an integer >= 1"),
        ({"new_repeats": 0}, "data.new_repeats must be an integer >= 1"),
        ({"num_replay": "100"}, "data.num_replay must be an integer"),
    ],
)
def test_bad_new_concept_values_are_refused_with_the_key(kwargs, message):
    from imagen.data.shapes_datamodule import NewConceptShapesDataModule

    args = {"new_concept": [{"color": "orange"}], "colors": ["red", "green", "orange"], **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        NewConceptShapesDataModule(use_judge=False, num_train=4, **args)


def test_new_concept_validation_may_hold_new_concept_scenes_only():
    from imagen.data.shapes_datamodule import NewConceptShapesDataModule

    dm = NewConceptShapesDataModule([{"color": "red"}], num_train=4, num_replay=0, num_val=0, use_judge=False)
    assert len(dm.split("val").scenes) == dm.hparams.num_val_new
