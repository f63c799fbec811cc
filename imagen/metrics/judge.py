"""Judge accuracy: does an image show what its caption says?

The judge is trained once on ground-truth renders of every attribute combination (held-out ones included:
it is the measuring instrument, not a model under test) and cached on disk, keyed by the renderer's
appearance settings and the judge's own settings.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from imagen.data.shapes import (
    Scene,
    SceneSampler,
    ShapeObject,
    ShapesConfig,
    matches_caption,
    render,
    scene_from_targets,
    scene_targets,
)
from imagen.files import atomic_file
from imagen.models.judge import JudgeConfig, JudgeNet, degrade
from imagen.precision import autocast
from imagen.progress import progress_bar

log = logging.getLogger(__name__)

JUDGE_VERSION = 3  # bump when the judge's architecture or recipe changes, to invalidate caches


def render_batch(config: ShapesConfig, scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:
    """Render scenes to a float tensor (N, 3, H, W) in [-1, 1]."""
    pixels = np.stack([render(s, config, rng) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Judge:
    """A trained `JudgeNet` plus the renderer vocabulary needed to turn its labels into objects."""

    def __init__(self, net: JudgeNet, shapes: ShapesConfig):
        self.net = net.eval()
        self.shapes = shapes

    def to(self, device: torch.device | str) -> Judge:
        self.net.to(device)
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Per-cell labels (B, GRID*GRID, 3) for images (B, 3, H, W) in [-1, 1]."""
        device = next(self.net.parameters()).device
        out = [
            self.net.predict(images[i : i + batch_size].to(device).float())
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).cpu()

    def detect(self, images: torch.Tensor) -> list[list[ShapeObject]]:
        return [scene_from_targets(t, self.shapes) for t in self.predict(images).numpy()]

    def exact(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Bool (B,): every cell's predicted attributes equal the ground truth (renders, reconstructions)."""
        return (self.predict(images) == targets.cpu()).flatten(1).all(dim=1)

    def matches(self, images: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
        """Bool (B,): the image shows everything its scene's caption says (generated images)."""
        return torch.tensor(
            [matches_caption(objs, s) for objs, s in zip(self.detect(images), scenes, strict=True)]
        )


def judge_cache_path(
    cache_dir: str | os.PathLike, shapes: ShapesConfig, config: JudgeConfig, steps: int
) -> Path:
    # the renderer, and the scenes it learns from (one object, or one and two)
    scenes = f"o{shapes.max_objects}-p{shapes.two_object_prob:g}"
    key = f"{shapes.appearance_key()}-{scenes}-c{config.channels}-s{steps}-v{JUDGE_VERSION}"
    return Path(cache_dir) / "judge" / f"judge-{key}.pt"


def train_judge(
    shapes: ShapesConfig,
    config: JudgeConfig,
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 2e-3,
    num_train: int = 24000,
    num_test: int = 2000,
    seed: int = 12345,
) -> tuple[JudgeNet, float]:
    """Train a judge on fresh renders; returns the net (in eval mode) and its exact accuracy on test renders."""
    # seeds the CPU generator only (the caller forks it); CUDA's generators are left alone
    torch.default_generator.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sampler = SceneSampler(shapes)
    train_scenes = [sampler.sample(rng) for _ in range(num_train)]
    test_scenes = [sampler.sample(rng) for _ in range(num_test)]
    x_train, x_test = render_batch(shapes, train_scenes, rng), render_batch(shapes, test_scenes, rng)
    y_train = torch.from_numpy(np.stack([scene_targets(s, shapes) for s in train_scenes]))
    y_test = torch.from_numpy(np.stack([scene_targets(s, shapes) for s in test_scenes]))

    net = JudgeNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    with progress_bar() as progress:
        task = progress.add_task("training the shapes judge", total=steps)
        for _ in range(steps):
            idx = torch.randint(0, num_train, (batch_size,))
            with autocast("cpu"):
                loss = net.loss(degrade(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(
                task, advance=1, description=f"training the shapes judge (loss {loss.item():.3f})"
            )
    net.eval()
    accuracy = Judge(net, shapes).exact(x_test, y_test).float().mean().item()
    return net, accuracy


def load_or_train_judge(
    shapes: ShapesConfig, cache_dir: str | os.PathLike, config: JudgeConfig | None = None, steps: int = 500
) -> Judge:
    """Load the cached judge for these renderer settings, training and caching it first if needed."""
    config = config or JudgeConfig(len(shapes.colors), len(shapes.shapes), len(shapes.sizes))
    path = judge_cache_path(cache_dir, shapes, config, steps)
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or corrupt cache is rebuilt, not trusted
            log.warning(f"judge cache {path} is unreadable ({e}); training it again")
        else:
            with torch.random.fork_rng(
                devices=[]
            ):  # its random init is overwritten: leave the caller's RNG alone
                net = JudgeNet(JudgeConfig(**payload["config"]))
            net.load_state_dict(payload["state_dict"])
            return Judge(net, shapes)
    start = time.time()
    with torch.random.fork_rng(
        devices=[]
    ):  # seeds its own RNG; the caller's stream (training) is left as it was
        net, accuracy = train_judge(shapes, config, steps=steps)
    log.info(
        f"judge trained in {time.time() - start:.0f}s; exact accuracy on fresh test renders {accuracy:.2%}"
    )
    if accuracy < 0.99:
        log.warning(
            f"the judge reaches only {accuracy:.2%} on ground-truth renders; judge metrics are unreliable"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:  # a concurrent reader sees the old state or the whole new file
        torch.save(
            {"state_dict": net.state_dict(), "config": asdict(config), "test_accuracy": accuracy}, temporary
        )
    return Judge(net, shapes)
