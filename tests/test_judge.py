"""The judge: accurate on fresh ground-truth renders, cached, and invisible to the caller's random streams."""

from __future__ import annotations

import numpy as np
import torch

from imagen.data.shapes import SceneSampler, ShapesConfig, scene_targets
from imagen.metrics.judge import load_or_train_judge, render_batch


def test_judge_is_accurate_on_fresh_renders_and_leaves_the_rng_alone(cache_dir):
    shapes = ShapesConfig()
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    judge = load_or_train_judge(shapes, cache_dir)  # trains and caches it (or loads the session's copy)
    assert torch.equal(torch.random.get_rng_state(), state), "training/loading the judge moved the global RNG"
    again = load_or_train_judge(shapes, cache_dir)  # from the cache: builds a net, then loads its weights
    assert torch.equal(torch.random.get_rng_state(), state), "loading the cached judge moved the global RNG"

    # scenes and renders the judge never saw (its training uses another seed)
    rng = np.random.default_rng(2026)
    sampler = SceneSampler(shapes)
    scenes = [sampler.sample(rng) for _ in range(1000)]
    images = render_batch(shapes, scenes, rng)
    targets = torch.from_numpy(np.stack([scene_targets(s, shapes) for s in scenes]))
    accuracy = judge.exact(images, targets).float().mean().item()
    assert accuracy >= 0.99, f"judge exact accuracy {accuracy:.2%} on ground-truth renders"
    assert torch.equal(again.predict(images[:64]), judge.predict(images[:64]))
