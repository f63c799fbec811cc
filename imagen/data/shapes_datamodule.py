"""The embedded default data: captioned shapes, rendered in memory from a seed (no download); and its variant
for teaching a fine-tuned model a concept it never saw (`NewConceptShapesDataModule`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imagen.data.formats import SPLITS, STAGE_SPLITS
from imagen.data.resumable import ResumableLoader
from imagen.data.shapes import (
    GRID,
    Scene,
    SceneSampler,
    ShapesConfig,
    as_combinations,
    has_combination,
    matches_caption,
    mirror_words,
    render,
    scene_targets,
)
from imagen.metrics.judge import Judge, load_or_train_judge, render_batch
from imagen.values import check_fraction, check_int, is_int

log = logging.getLogger(__name__)

SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


@dataclass
class ShapesSplit:
    """Rendered images and their ground truth for one split."""

    images: np.ndarray  # (N, H, W, 3) uint8
    scenes: list[Scene]
    captions: list[list[str]]  # paraphrases per scene
    heldout: np.ndarray  # (N,) bool: contains a held-out composition
    targets: np.ndarray  # (N, GRID * GRID, 3) per-cell labels
    caption_choice: np.ndarray | None  # (N,) fixed paraphrase per sample (eval splits); None: random (train)


def sample_scenes(
    config: ShapesConfig,
    split: str,
    num_seen: int,
    num_heldout: int,
    seed: int,
    heldout_in_train: bool = False,
) -> tuple[list[Scene], np.random.Generator]:
    """A split's scenes, sampled deterministically from `seed`, and the generator that goes on to render them
    (`render_split`). The training split holds no held-out composition unless `heldout_in_train` (images for stages
    that never read captions: the autoencoder)."""
    rng = split_rng(seed, split)
    sampler = SceneSampler(config)
    restrict = False if config.heldout and not (split == "train" and heldout_in_train) else None
    scenes = [sampler.sample(rng, heldout=restrict) for _ in range(num_seen)]
    if num_heldout and config.heldout:
        scenes += [sampler.sample(rng, heldout=True) for _ in range(num_heldout)]
    return scenes, rng


def split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SEED_OFFSET[split]])


def render_split(
    config: ShapesConfig, split: str, scenes: list[Scene], rng: np.random.Generator
) -> ShapesSplit:
    """Render sampled scenes with their ground truth; evaluation splits fix one caption paraphrase per scene."""
    images = np.stack([render(s, config, rng) for s in scenes])
    captions = [s.captions() for s in scenes]
    choice = None if split == "train" else rng.integers(0, len(captions[0]), size=len(scenes))
    return ShapesSplit(
        images=images,
        scenes=scenes,
        captions=captions,
        heldout=np.array([any(config.is_heldout(o) for o in s.objects) for s in scenes]),
        targets=np.stack([scene_targets(s, config) for s in scenes]),
        caption_choice=choice,
    )


@dataclass(frozen=True)
class SceneGroups:
    """The prompt group of a scene (called with it): `new` if it shows `new_concept`, `heldout` if it holds a held-out
    composition of `config`, else `seen`. Picklable, for the training dataset in dataloader workers."""

    config: ShapesConfig
    new_concept: tuple[dict[str, str], ...] = ()

    def __call__(self, scene: Scene) -> str:
        if self.new_concept and any(has_combination(o, list(self.new_concept)) for o in scene.objects):
            return "new"
        return "heldout" if any(self.config.is_heldout(o) for o in scene.objects) else "seen"


def take_rows(split: ShapesSplit, rows: np.ndarray) -> ShapesSplit:
    """The split's samples at `rows` (in that order, repeats allowed)."""
    choice = None if split.caption_choice is None else split.caption_choice[rows]
    return ShapesSplit(images=split.images[rows], scenes=[split.scenes[i] for i in rows],
                       captions=[split.captions[i] for i in rows], heldout=split.heldout[rows],
                       targets=split.targets[rows], caption_choice=choice)  # fmt: skip


class ShapesDataset(Dataset):
    """Items: image (3, H, W) float in [-1, 1], caption, target (GRID*GRID, 3), heldout, index; with
    `hard_negatives` (a training split's `ShapesConfig`) also `negative_caption`, a caption false of the image that
    reuses its words (`Scene.hard_negative`, kept in the shown scene's prompt group by `scene_groups`, by default
    `SceneGroups(hard_negatives)`, so that no held-out composition enters training); else the caption of another
    training scene that is false of the image.

    Indexed by `index` or by `(index, item_seed)` (from `EpochShuffleSampler`); training draws a fresh caption
    paraphrase each time, from `item_seed` when given, else from the torch RNG (seeded per worker). With `hflip` (True,
    or per sample whether it may be mirrored), half of the items (drawn the same way) show the image mirrored
    left-right with its caption, target and hard negative those of the mirrored scene (`Scene.mirrored`).
    """

    def __init__(
        self,
        split: ShapesSplit,
        hard_negatives: ShapesConfig | None = None,
        hflip: bool | np.ndarray = False,
        scene_groups: SceneGroups | None = None,
    ):
        self.split = split
        self.hard_negatives = hard_negatives
        if scene_groups is None and hard_negatives is not None:
            scene_groups = SceneGroups(hard_negatives)
        self.scene_groups = scene_groups
        self.hflip = np.broadcast_to(np.asarray(hflip, dtype=bool), (len(split.scenes),))

    def __len__(self) -> int:
        return len(self.split.scenes)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, item_seed = key if isinstance(key, tuple) else (key, None)
        s = self.split
        scene, paraphrases = s.scenes[index], s.captions[index]
        image = torch.from_numpy(s.images[index]).permute(2, 0, 1).float().div(127.5).sub(1.0)
        target = torch.from_numpy(s.targets[index])
        mirrored = bool(self.hflip[index]) and self._mirror(index, item_seed)
        if mirrored:
            scene = scene.mirrored()
            paraphrases = scene.captions()
            image = image.flip(-1)
            # (GRID * GRID, 3) per-cell labels, row-major: reverse each row's cells
            target = target.reshape(GRID, GRID, -1).flip(1).reshape(GRID * GRID, -1)
        if s.caption_choice is None and item_seed is not None:
            caption = paraphrases[item_seed % len(paraphrases)]
        elif s.caption_choice is None:
            caption = paraphrases[int(torch.randint(len(paraphrases), ()))]
        else:
            caption = paraphrases[s.caption_choice[index]]
        item = {
            "image": image,
            "caption": caption,
            "target": target,
            "heldout": bool(s.heldout[index]),
            "index": index,
            "mirrored": mirrored,  # the image and caption show the mirror image of scene `index`
        }
        if self.hard_negatives is not None:
            item["negative_caption"] = self.negative_caption(scene, index, item_seed)
        return item

    @staticmethod
    def _mirror(index: int, item_seed: int | None) -> bool:
        if item_seed is None:
            return bool(torch.randint(2, ()))
        return bool(np.random.default_rng([item_seed, index, 1]).random() < 0.5)

    def negative_caption(self, scene: Scene, index: int, item_seed: int | None) -> str:
        """A hard negative caption of item `index`, which shows `scene`."""
        seed = int(torch.randint(2**31, ())) if item_seed is None else item_seed
        rng = np.random.default_rng([seed, index])
        config, group = self.hard_negatives, self.scene_groups(scene)
        same_group = lambda other: self.scene_groups(other) == group  # noqa: E731
        negative = scene.hard_negative(rng, config.positions, config.sizes, keep=same_group)
        if negative is None:
            negative = self.other_scene(scene, rng)
        paraphrases = negative.captions()
        return paraphrases[rng.integers(len(paraphrases))]

    def other_scene(self, scene: Scene, rng: np.random.Generator) -> Scene:
        """A training scene whose caption is false of `scene`'s image, from a random start (the repeats of a scene,
        `new_repeats`, and its look-alikes are passed over)."""
        scenes = self.split.scenes
        start = int(rng.integers(len(scenes)))
        for offset in range(len(scenes)):
            other = scenes[(start + offset) % len(scenes)]
            if not matches_caption(list(scene.objects), other):
                return other
        raise ValueError(
            f"data.hard_negatives: every one of the {len(scenes)} training scenes shows what the caption of "
            f"{scene.captions()[0]!r} says, so none is a negative; add training scenes (data.num_train)"
        )


class ShapesDataModule(pl.LightningDataModule):
    """Captioned shapes with train/val/test splits and a compositional held-out split.

    Validation and test splits hold `num_*` scenes of seen compositions plus `num_*_heldout` scenes with at
    least one held-out composition. `judge` (trained once and cached in `cache_dir`) scores whether an image
    shows what its caption says.
    """

    def __init__(
        self,
        image_size: int = 32,
        colors: list[str] | None = None,
        shapes: list[str] | None = None,
        sizes: list[str] | None = None,
        positions: list[str] | None = None,
        max_objects: int = 2,
        two_object_prob: float = 0.5,
        jitter: int = 1,
        size_jitter: float = 0.0,
        background: tuple[int, int, int] = (0, 0, 0),
        supersample: int = 4,
        heldout: list[dict[str, str]] | None = None,
        num_train: int = 20000,
        heldout_in_train: bool = False,
        num_val: int = 512,
        num_val_heldout: int = 256,
        num_test: int = 1024,
        num_test_heldout: int = 512,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        cache_dir: str = ".cache",
        use_judge: bool = True,
        judge_steps: int = 500,
        hard_negatives: bool = False,
        train_two_object_prob: float | None = None,
        train_hflip: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        defaults = ShapesConfig()
        self.config = ShapesConfig(
            image_size=image_size,
            colors=list(defaults.colors if colors is None else colors),  # [] is refused, not replaced
            shapes=list(defaults.shapes if shapes is None else shapes),
            sizes=list(defaults.sizes if sizes is None else sizes),
            positions=list(defaults.positions if positions is None else positions),
            max_objects=max_objects,
            two_object_prob=two_object_prob,
            jitter=jitter,
            size_jitter=size_jitter,
            background=background,
            supersample=supersample,
            heldout=as_combinations(heldout, "data.heldout"),
        )
        if train_two_object_prob is not None:
            check_fraction("data.train_two_object_prob (or null)", train_two_object_prob)
        for key in ("batch_size", "eval_batch_size", "judge_steps"):
            check_int(f"data.{key}", self.hparams[key], 1)
        for key in ("seed", "num_workers"):
            check_int(f"data.{key}", self.hparams[key], 0)
        for key in (
            "heldout_in_train",
            "train_hflip",
            "hard_negatives",
            "use_judge",
            "pin_memory",
            "persistent_workers",
        ):
            if not isinstance(self.hparams[key], bool):  # a string such as `no` would read as true
                raise ValueError(f"data.{key} must be true or false, got {self.hparams[key]!r}")
        unmirrored = [p for p in self.config.positions if mirror_words(p) not in self.config.positions]
        if train_hflip and unmirrored:  # a mirrored item would show a position the data never names
            raise ValueError(
                f"data.train_hflip=true mirrors positions, but the mirror image of {unmirrored} is not among "
                f"data.positions={self.config.positions}"
            )
        self.check_split_sizes()
        self.scene_groups = SceneGroups(self.config)
        self.splits: dict[str, ShapesSplit] = {}
        self._judge: Judge | None = None

    # the settings whose sum is a split's number of scenes (`*_heldout` only with `data.heldout`)
    split_size_keys: dict[str, tuple[str, ...]] = {
        "train": ("num_train",),
        "val": ("num_val", "num_val_heldout"),
        "test": ("num_test", "num_test_heldout"),
    }

    def check_split_sizes(self) -> None:
        """Each `split_size_keys` setting must be >= 0 and each split hold at least one scene; `ValueError`."""
        for split, keys in self.split_size_keys.items():
            counted = {
                f"data.{k}": self.hparams[k] for k in keys if self.config.heldout or "heldout" not in k
            }
            settings = " + ".join(f"{k}={v}" for k, v in counted.items())
            for k, v in counted.items():
                if not is_int(v):
                    raise ValueError(f"{k} must be an integer (a number of scenes), got {v!r}")
            if any(v < 0 for v in counted.values()):
                raise ValueError(f"{settings}: each must be >= 0")
            if sum(counted.values()) < 1:
                raise ValueError(f"{settings}: the {split} split needs at least one scene")

    # groups of evaluation prompts (`eval_prompts`), each scored apart by the generator stages
    prompt_groups: tuple[str, ...] = ("seen", "heldout")

    def scene_group(self, scene: Scene) -> str:
        """The prompt group of a scene: `heldout` if it holds a held-out composition, else `seen` (`new` if it
        shows the new concept of `NewConceptShapesDataModule`)."""
        return self.scene_groups(scene)

    def prepare_data(self) -> None:
        # Runs on one process per node before setup: trains and caches the judge once.
        if self.hparams.use_judge:
            load_or_train_judge(self.config, self.hparams.cache_dir, steps=self.hparams.judge_steps)

    def split_scenes(self, split: str) -> tuple[list[Scene], np.random.Generator]:
        """A split's scenes, sampled deterministically, and the generator that goes on to render them."""
        h = self.hparams
        sizes = {
            "train": (h.num_train, 0),
            "val": (h.num_val, h.num_val_heldout),
            "test": (h.num_test, h.num_test_heldout),
        }
        return sample_scenes(self.split_config(split), split, *sizes[split], h.seed, h.heldout_in_train)

    def build_split(self, split: str) -> ShapesSplit:
        return render_split(self.split_config(split), split, *self.split_scenes(split))

    def split_config(self, split: str) -> ShapesConfig:
        """The scene distribution of a split: the training split may hold more two-object scenes
        (`train_two_object_prob`) while validation and test keep `two_object_prob`."""
        p = self.hparams.train_two_object_prob
        if split != "train" or p is None:
            return self.config
        return replace(self.config, two_object_prob=p)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split not in self.splits:
                self.splits[split] = self.build_split(split)
        if h.use_judge and self._judge is None:
            self._judge = load_or_train_judge(self.config, h.cache_dir, steps=h.judge_steps)

    @property
    def judge(self) -> Judge | None:
        return self._judge

    def split(self, name: str) -> ShapesSplit:
        if name not in self.splits:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[name])
        return self.splits[name]

    def eval_prompts(self, split: str, group: str = "seen", limit: int | None = None):
        """The fixed prompts of an evaluation split from one of `prompt_groups` (seen or held-out compositions,
        ...), the first `limit` of them: (captions (one fixed paraphrase each), scenes, real images (N, 3, H, W)
        in [-1, 1])."""
        s = self.split(split)
        rows = [i for i, scene in enumerate(s.scenes) if self.scene_group(scene) == group][:limit]
        choice = s.caption_choice if s.caption_choice is not None else [0] * len(s.scenes)
        images = torch.from_numpy(s.images[rows]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return [s.captions[i][choice[i]] for i in rows], [s.scenes[i] for i in rows], images

    def binding_pairs(self, split: str, group: str = "seen", limit: int | None = None):
        """Two-object prompts of an evaluation split whose objects differ in appearance, the first `limit`:
        (captions, images, swapped) where `swapped` shows the same layout with the two objects' color, shape and
        size exchanged (both rendered with one seed per prompt, so the jitter is the same). A model that binds
        attributes to objects finds its caption's image more likely; one that reads a bag of attributes cannot
        tell them apart (`binding_acc` of the generator stages)."""
        captions, scenes, _ = self.eval_prompts(split, group=group)
        out_captions, images, swapped = [], [], []
        for i, (caption, scene) in enumerate(zip(captions, scenes, strict=True)):
            if limit is not None and len(out_captions) >= limit:
                break
            exchanged = scene.attributes_swapped()
            if exchanged is None:
                continue
            seed = [self.hparams.seed, SPLIT_SEED_OFFSET[split], i]
            images.append(render_batch(self.config, [scene], np.random.default_rng(seed)))
            swapped.append(render_batch(self.config, [exchanged], np.random.default_rng(seed)))
            out_captions.append(caption)
        if not out_captions:
            empty = torch.empty(0, 3, self.config.image_size, self.config.image_size)
            return [], empty, empty.clone()
        return out_captions, torch.cat(images), torch.cat(swapped)

    def train_captions(self) -> list[str]:
        """Every paraphrase of every training caption (for training a caption tokenizer). Without the rendered
        training split (a test of a checkpoint), its scenes are sampled and not rendered: 1.8 s instead of 9.8 s
        and 300 MB for 100k scenes on 2 CPU cores."""
        if "train" in self.splits:
            return [c for caps in self.splits["train"].captions for c in caps]
        return [c for scene in self.split_scenes("train")[0] for c in scene.captions()]

    def _loader_settings(self) -> dict:
        h = self.hparams
        return {
            "num_workers": h.num_workers,
            "pin_memory": h.pin_memory,
            "persistent_workers": h.persistent_workers and h.num_workers > 0,
        }

    def mirrorable(self, split: ShapesSplit) -> np.ndarray:
        """(N,) bool: whether a sample's mirror image stays in its prompt group (`scene_group`). A mirrored "red at
        right" would otherwise teach a held-out "red at left" (`data.heldout` naming a position)."""
        keep = np.array([self.scene_group(s.mirrored()) == self.scene_group(s) for s in split.scenes])
        if not keep.all():
            log.info(
                f"data.train_hflip: {int((~keep).sum())} of {len(keep)} training samples are never mirrored: their "
                "mirror image would change their prompt group (a held-out composition or the new concept)"
            )
        return keep

    def train_dataloader(self) -> DataLoader:
        # resumable mid-epoch; the order comes from the run's seed (`seed`, set by seed_everything)
        h = self.hparams
        split = self.split("train")
        hflip = self.mirrorable(split) if h.train_hflip else False
        dataset = ShapesDataset(split, self.config if h.hard_negatives else None, hflip, self.scene_groups)
        return ResumableLoader(
            dataset,
            self.hparams.batch_size,
            seed=torch.initial_seed(),
            item_seeds=True,
            **self._loader_settings(),
        )

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = ShapesDataset(self.split(split))
        return DataLoader(dataset, batch_size=self.hparams.eval_batch_size, **self._loader_settings())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class NewConceptShapesDataModule(ShapesDataModule):
    """Captioned shapes for teaching a trained model a concept its pre-training never saw (`new_concept`, e.g.
    `[{color: orange}]`, attribute combinations like `heldout`'s).

    Training: `num_train` scenes showing the new concept (few: the point is learning from little data), each
    `new_repeats` times per epoch (the same images: a larger share of each batch), plus `num_replay` scenes without
    it, from the pre-training distribution (replay, against forgetting). Validation
    and test: `num_*` scenes of seen compositions and `num_*_heldout` of held-out ones, both without the new
    concept (the old prompts), plus `num_*_new` with it: the prompt group `new` (`judge_acc_new`). No split holds a
    held-out composition together with the new concept. Other arguments are `ShapesDataModule`'s; `colors` (and
    the judge trained for them) must include the new concept.
    """

    prompt_groups = ("seen", "heldout", "new")
    split_size_keys = {
        "train": ("num_replay", "num_train"),
        "val": ("num_val", "num_val_heldout", "num_val_new"),
        "test": ("num_test", "num_test_heldout", "num_test_new"),
    }

    def __init__(
        self,
        new_concept: list[dict[str, str]],
        num_replay: int = 800,
        new_repeats: int = 1,
        num_val_new: int = 128,
        num_test_new: int = 256,
        **shapes_args,
    ):
        super().__init__(**shapes_args)
        self.new_concept = as_combinations(new_concept, "data.new_concept")
        if not self.new_concept:
            raise ValueError("data.new_concept is empty: name the concept to teach, e.g. [{color: orange}]")
        self.config.check_combinations(self.new_concept, "data.new_concept")
        check_int("data.new_repeats", new_repeats, 1)
        self.scene_groups = SceneGroups(self.config, tuple(self.new_concept))

    def split_scenes(self, split: str) -> tuple[list[Scene], np.random.Generator]:
        h = self.hparams
        old, heldout, new = {
            "train": (h.num_replay, 0, h.num_train),
            "val": (h.num_val, h.num_val_heldout, h.num_val_new),
            "test": (h.num_test, h.num_test_heldout, h.num_test_new),
        }[split]
        rng = split_rng(h.seed, split)
        sampler = SceneSampler(self.split_config(split))
        seen = False if self.config.heldout else None
        scenes = [
            *self._draw(sampler, rng, old, seen, "seen"),
            *(self._draw(sampler, rng, heldout, True, "heldout") if self.config.heldout else []),
            *self._draw(sampler, rng, new, seen, "new"),
        ]
        return scenes, rng

    def build_split(self, split: str) -> ShapesSplit:
        h = self.hparams
        scenes, rng = self.split_scenes(split)
        rendered = render_split(self.config, split, scenes, rng)
        if split != "train" or h.new_repeats == 1:
            return rendered
        new_rows = np.arange(len(scenes) - h.num_train, len(scenes))  # the new-concept scenes come last
        repeats = np.repeat(new_rows, h.new_repeats - 1)
        return take_rows(rendered, np.concatenate([np.arange(len(scenes)), repeats]))

    def _draw(self, sampler: SceneSampler, rng, n: int, heldout: bool | None, group: str) -> list[Scene]:
        """`n` scenes of `group`, drawn by rejection."""
        scenes = []
        for _ in range(1000 * n):
            if len(scenes) == n:
                break
            scene = sampler.sample(rng, heldout=heldout)
            if self.scene_group(scene) == group:
                scenes.append(scene)
        if len(scenes) < n:
            raise RuntimeError(f"could not sample {n} {group} scenes for data.new_concept={self.new_concept}")
        return scenes
