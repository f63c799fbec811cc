"""The README's commands stay true: every `train.py`, `sample.py` and `imagen.cli.encode` command in its bash blocks
composes and resolves with the shipped configs (a renamed key, an interpolation of an undefined one or a value Hydra
cannot parse fails here, not for a reader)."""

from __future__ import annotations

import re
import shlex

import pytest
from omegaconf import OmegaConf

from imagen.cli.pipeline import ignored_overrides, is_pipeline
from tests.conftest import REPO, compose_config

ENTRY_POINTS = {"train.py": "train", "sample.py": "sample", "-m imagen.cli.encode": "encode"}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(config name, overrides) of each command, with the README's shell variables ($AE) expanded, `<run>`
    placeholders filled, optional [key=value] arguments kept and a sweep's comma lists cut to their first value."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        variables: dict[str, str] = {}
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if assignment := re.fullmatch(r'([A-Z_]+)="(.*)"', line.strip()):
                variables[assignment[1]] = assignment[2]
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            for entry, config in ENTRY_POINTS.items():
                if (found := line.find(entry)) >= 0:
                    words = shlex.split(line[found + len(entry) :], comments=True)
                    sweep = "-m" in words
                    overrides = []
                    for word in words:
                        if word == "-m":
                            continue
                        word = word.replace("<run>", "RUN")
                        if optional := re.fullmatch(r"\[([\w./]+=[^\[\]]*)\]", word):
                            word = optional[1]
                        if sweep and re.fullmatch(r"[\w.]+=[\w.]+(,[\w.]+)+", word):
                            word = word.split(",")[0]
                        overrides.append(word)
                    commands.append((config, overrides))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_entry_point():
    assert {config for config, _ in COMMANDS} == set(ENTRY_POINTS.values()) and len(COMMANDS) > 30


@pytest.mark.parametrize("config,overrides", COMMANDS, ids=[" ".join(o)[:80] for _, o in COMMANDS])
def test_readme_command_composes(config, overrides, tmp_path):
    if "hydra/launcher=slurm" in overrides:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if any(o.startswith("hparams_search=") and o.endswith("_optuna") for o in overrides):  # the sweep extra
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_config(overrides, tmp_path / "run", config)
    # every interpolation names a defined key
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    # the quickstart refuses what it would not pass on to its stages
    if config == "train" and is_pipeline(cfg):
        assert ignored_overrides([o for o in overrides if "=" in o]) == []
