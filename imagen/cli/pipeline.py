"""Several stages in one command: `python train.py experiment=quickstart` (the default) trains the autoencoder,
then the stage built on it, evaluates each on its test split and prints one summary table.

Each stage is an ordinary training run composed from `conf/train.yaml` with its own overrides
(`pipeline.stages.<name>`), in a fixed directory `pipeline.dir/<name>`. A stage's override `{other}` is replaced
by the last checkpoint of the earlier stage `other`. With `pipeline.reuse`, a stage whose directory already
holds a finished run of the same overrides, the same composed config and the same checkpoints of the earlier stages
it reads (metrics.json, checkpoints/last.ckpt, pipeline_stage.yaml; a default changed in `conf/` since, or an earlier
stage trained again, counts as a change) is not trained again; one trained by other code (the digest of imagen/ and
conf/ differs) is reused with a warning, and the summary says so. A finished run is never resumed: a stage trained
again starts afresh, its earlier run moved aside. The command line's `tags` and `extras.*` reach every stage too;
they are labels, so a stage finished under other tags is still reused. Under DDP every process runs the pipeline;
only the launching one (global rank 0) moves, deletes or writes in the stages' directories, and the others wait for
it to prepare each stage before they decide as it did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imagen.checkpoints import checkpoint_sha256
from imagen.cli.checks import ConfigError, check_input_checkpoints, check_train_config
from imagen.cli.utils import write_metrics
from imagen.distributed import launching_process, srun_tasks
from imagen.files import file_in_the_way, source_digest, write_text_atomic

log = logging.getLogger("imagen")

STAGE_RECORD = "pipeline_stage.yaml"
# the summary's columns: (header, stage metric key)
SUMMARY_METRICS = [
    ("PSNR", "test/psnr"),
    ("judge acc", "test/judge_acc"),
    ("judge acc held-out", "test/judge_acc_heldout"),
    ("judge acc reranked", "test/judge_acc_reranked"),
    ("judge acc held-out reranked", "test/judge_acc_heldout_reranked"),
    ("R@1 text->image", "test/recall_at_1_t2i"),
    ("R@1 image->text", "test/recall_at_1_i2t"),
    ("caption acc", "test/caption_acc"),
    ("round trip", "test/round_trip"),
]


def override_value(value: str) -> str:
    """`value` as the value of a Hydra override: as it is where the grammar reads it back unchanged (so that the
    stage records of earlier runs still match), else quoted (parentheses, commas, '=', quotes, ...); a backslash
    escapes only a quote or the backslashes before one."""
    try:
        if OverridesParser.create().parse_override(f"k={value}").value() == value:
            return value
    except HydraException:  # the grammar does not parse it unquoted
        pass
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: 2 * m.group(1), value).replace("'", "\\'")
    return f"'{escaped}'"


def stage_overrides(cfg: DictConfig, name: str, checkpoints: dict[str, str], run_dir: Path) -> list[str]:
    """The stage's own overrides with `{stage}` checkpoint references filled in, then the shared ones; the paths
    quoted as override values need."""
    overrides = []
    for item in [*cfg.pipeline.stages[name], *cfg.pipeline.get("common", [])]:
        item = str(item)
        for earlier, ckpt in checkpoints.items():
            if item.endswith("={" + earlier + "}"):  # the whole value
                item = item.removesuffix("{" + earlier + "}") + override_value(ckpt)
            item = item.replace("{" + earlier + "}", ckpt)
        for later in cfg.pipeline.stages:
            if "{" + later + "}" in item:
                raise ConfigError(
                    f"pipeline.stages.{name}: {item!r} refers to stage {later!r}, which does not run before it; "
                    f"earlier stages: {sorted(checkpoints) or 'none'}"
                )
        overrides.append(item)
    paths = cfg.paths
    return [
        *overrides,
        *(
            f"paths.{key}={override_value(str(paths[key]))}"
            for key in ("root_dir", "data_dir", "log_dir", "cache_dir")
        ),
        f"paths.output_dir={override_value(str(run_dir))}",
        f"hydra.run.dir={override_value(str(run_dir))}",
    ]


def read_record(run_dir: Path) -> dict:
    """The stage's record ({} where there is none, or one that does not parse)."""
    try:
        record = yaml.safe_load((run_dir / STAGE_RECORD).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(run_dir: Path, record: dict) -> None:
    """Write the stage's record atomically: other processes may be reading it (`wait_for_record`)."""
    write_text_atomic(run_dir / STAGE_RECORD, yaml.safe_dump(record, sort_keys=False))


def settings_digest(stage_cfg: DictConfig) -> str:
    """A digest of a stage's composed config, interpolations unresolved: equal for the same settings."""
    return hashlib.sha256(OmegaConf.to_yaml(stage_cfg).encode()).hexdigest()[:16]


def upstream_checkpoints(cfg: DictConfig, name: str, checkpoints: dict[str, str]) -> dict[str, str]:
    """The SHA-256 of each earlier stage's checkpoint that stage `name` reads (`{stage}` in its overrides)."""
    items = " ".join(str(item) for item in [*cfg.pipeline.stages[name], *cfg.pipeline.get("common", [])])
    return {
        earlier: checkpoint_sha256(ckpt)
        for earlier, ckpt in checkpoints.items()
        if "{" + earlier + "}" in items
    }


def same_settings(record: dict, overrides: list[str], digest: str, inputs: dict[str, str]) -> bool:
    return (
        record.get("overrides") == overrides
        and record.get("settings") == digest
        and record.get("inputs", {}) == inputs
    )


def finished(run_dir: Path, overrides: list[str], digest: str, inputs: dict[str, str]) -> bool:
    record = read_record(run_dir)
    return (
        same_settings(record, overrides, digest, inputs)
        and record.get("finished", False)
        and (run_dir / "metrics.json").is_file()
        and (run_dir / "checkpoints" / "last.ckpt").is_file()
    )


def previous_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".previous")


def restore_previous(run_dir: Path, overrides: list[str], digest: str, inputs: dict[str, str]) -> bool:
    """Bring back a run of these settings that finished and was moved aside to `<stage>.previous` by a run of other
    settings (swapped with the stage's directory, which takes its place); whether there was one."""
    previous = previous_dir(run_dir)
    if finished(run_dir, overrides, digest, inputs) or not finished(previous, overrides, digest, inputs):
        return False
    swap = run_dir.with_name(run_dir.name + ".swap")
    if swap.exists():
        shutil.rmtree(swap)
    if run_dir.exists():
        run_dir.rename(swap)
    previous.rename(run_dir)
    if swap.exists():
        swap.rename(previous)
    log.info(f"pipeline: {previous} held this stage finished with these settings; it is back in {run_dir}")
    return True


def prepare_run_dir(
    run_dir: Path,
    overrides: list[str],
    digest: str,
    inputs: dict[str, str],
    fresh: bool = False,
    launch: str | None = None,
    source: str | None = None,
) -> None:
    """A stage interrupted with the same settings continues in its directory (its checkpoints resume it), unless
    `fresh` (`pipeline.reuse=false`); a directory from other settings or inputs, or a finished run, is moved aside
    to `<stage>.previous` rather than mixed with, or resumed by, the new run. A directory without a checkpoint (an
    attempt that failed before its first save) is deleted instead, so it never replaces the run kept there."""
    record = read_record(run_dir)
    resumable = (
        not fresh and same_settings(record, overrides, digest, inputs) and not record.get("finished", False)
    )
    if run_dir.exists() and any(run_dir.iterdir()) and not resumable:
        if not any(run_dir.rglob("*.ckpt")):  # checkpoints/, and SLURM's hpc_ckpt_N.ckpt beside it
            shutil.rmtree(run_dir)
            log.info(f"pipeline: {run_dir} held no checkpoint (an attempt that stopped early); deleted it")
        else:
            previous = previous_dir(run_dir)
            if previous.exists():
                shutil.rmtree(previous)
            run_dir.rename(previous)
            log.info(f"pipeline: {run_dir} held a finished run or one of other settings; moved to {previous}")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "overrides": overrides,
        "settings": digest,
        "inputs": inputs,
        "finished": False,
        "launch": launch,
        "source": source,
    }
    write_record(run_dir, record)


def launch_id() -> str:
    """This command's id, stamped on the stage records by the launching process so that the others never mistake a
    record an earlier command left for this one's: a fresh one the launching process puts in its environment before
    its first stage, which the processes Lightning's launcher starts inherit."""
    if "IMAGEN_LAUNCH_ID" not in os.environ:
        os.environ["IMAGEN_LAUNCH_ID"] = uuid.uuid4().hex
    return os.environ["IMAGEN_LAUNCH_ID"]


def check_launcher() -> None:
    """Under DDP the pipeline runs only with Lightning's own launcher on one node, whose processes share the launching
    one's environment (and so `launch_id`); processes started apart (torchrun, srun with several tasks, another node)
    could not tell this command's stage records from an earlier command's."""
    env = os.environ
    # a process Lightning's launcher started from the launching one (its environment holds the launch id)
    child = "IMAGEN_LAUNCH_ID" in env and not launching_process()
    external = "TORCHELASTIC_RUN_ID" in env or srun_tasks() > 1
    if (external and not child) or not (launching_process() or child):
        raise ValueError(
            "the quickstart pipeline runs under DDP only with Lightning's own launcher on one node (e.g. "
            '\'pipeline.common=["trainer=ddp","trainer.devices=4"]\'), not under torchrun, srun with several tasks or on '
            "several nodes; train the stages one by one there (experiment=NAME), which any launcher runs"
        )


def stamp_record(run_dir: Path, launch: str) -> None:
    """Mark the stage record as this command's (the launching process, reusing a finished stage)."""
    record = read_record(run_dir)
    write_record(run_dir, {**record, "launch": launch})


def wait_for_record(
    run_dir: Path,
    overrides: list[str],
    digest: str,
    inputs: dict[str, str],
    launch: str,
    timeout_s: float = 3600.0,
) -> None:
    """Under DDP, a process other than the launching one waits until that one has decided on the stage (its record has
    these settings and this command's `launch` id), so that both decide the same: reuse the stage, or train it. It
    stops if the launching process (its parent, under Lightning's launcher) has exited."""
    start, said, parent = time.time(), 0.0, os.getppid()
    while True:
        record = read_record(run_dir)
        if same_settings(record, overrides, digest, inputs) and record.get("launch") == launch:
            return
        waited = time.time() - start
        if os.getppid() != parent or waited > timeout_s:
            why = "the launching process exited" if os.getppid() != parent else f"waited {timeout_s:.0f} s"
            raise RuntimeError(
                f"pipeline: {why} before preparing {run_dir} (launch {launch}, settings {digest}, inputs {inputs}); "
                f"its record holds launch {record.get('launch')}, settings {record.get('settings')}, inputs "
                f"{record.get('inputs')}"
            )
        if waited - said >= 60:
            said = waited
            log.info(f"pipeline: waiting for global rank 0 to prepare {run_dir} ({waited:.0f} s)")
        time.sleep(1.0)


@contextlib.contextmanager
def config_module():
    """Hydra's config search path: the running app's, or `imagen.conf` when called outside `hydra.main`."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_module(config_module="imagen.conf", version_base="1.3"):
            yield


def latest_grid(run_dir: Path) -> Path | None:
    """The newest captioned sample grid the image logger wrote for the test split (else for validation)."""
    for split in ("test", "val"):
        grids = sorted((run_dir / "images" / split).glob("*/*.png"), key=lambda p: p.stat().st_mtime)
        samples = [g for g in grids if "sample" in g.parent.name] or grids
        if samples:
            return samples[-1]
    return None


def summary_table(rows: list[dict]) -> str:
    """Markdown: one row per stage with its time and whichever summary metrics it logged."""
    columns = [(h, k) for h, k in SUMMARY_METRICS if any(k in r["metrics"] for r in rows)]
    header = ["stage", "minutes", "reused", *[h for h, _ in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = []
        for _, key in columns:
            v = r["metrics"].get(key)
            values.append("" if v is None else f"{v:.2f}" if key == "test/psnr" else f"{100 * v:.1f}%")
        reused = ("yes, by older code" if r.get("older_code") else "yes") if r["reused"] else "no"
        lines.append(f"| {r['stage']} | {r['seconds'] / 60:.1f} | {reused} | "
                     + " | ".join(values) + " |")  # fmt: skip
    return "\n".join(lines)


# command-line keys a pipeline itself uses; any other would be silently ignored, since each stage composes its own
PIPELINE_KEYS = {
    "pipeline",
    "experiment",
    "paths",
    "hydra",
    "extras",
    "task_name",
    "tags",
    "optimized_metric",
}


# the pipeline's command-line keys that it also gives every stage: they label or report a run without changing what
# it trains, so a stage that finished without them is still reused
LABEL_KEYS = {"tags", "extras"}


def override_key(override: str) -> str:
    """The top-level key an override sets: `+model.net.dim=8` -> `model`, `trainer/gpu` -> `trainer`."""
    return override.lstrip("+~").split("=")[0].split(".")[0].split("/")[0]


def ignored_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides a pipeline would not pass on to its stages."""
    return [o for o in overrides if override_key(o) not in PIPELINE_KEYS]


def label_overrides() -> list[str]:
    """The command line's `tags=...` and `extras.*=...`, which each stage gets too."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if override_key(o) in LABEL_KEYS]


def check_command_line() -> None:
    """Refuse overrides the pipeline would not pass on (`python train.py model.lr=...` runs no single stage)."""
    if not HydraConfig.initialized():
        return
    ignored = ignored_overrides(list(HydraConfig.get().overrides.task))
    if ignored:
        raise ValueError(
            f"{ignored}: the quickstart pipeline does not pass these to its stages. Train one stage with "
            f"experiment=NAME (e.g. experiment=shapes_autoencoder {' '.join(ignored)}), or give them to every "
            f"stage with 'pipeline.common=[{','.join(json.dumps(o) for o in ignored)}]'"
        )


def pipeline_root(cfg: DictConfig) -> Path:
    """`pipeline.dir`; in a multirun (`-m`), each job's own directory unless the command line sets `pipeline.dir`:
    jobs of a sweep sharing one folder would resume, move aside and delete each other's stages."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        given = any(o.lstrip("+~").startswith("pipeline.dir=") for o in hydra_cfg.overrides.task)
        if hydra_cfg.mode == RunMode.MULTIRUN and not given:
            return Path(cfg.paths.output_dir)
    return Path(cfg.pipeline.dir)


def stage_checkpoint(root: Path, name: str) -> str:
    """The checkpoint that `{name}` stands for in the overrides of the stages after stage `name`."""
    return str(root / name / "checkpoints" / "last.ckpt")


def compose_stage(
    cfg: DictConfig, name: str, checkpoints: dict[str, str], root: Path, labels: list[str]
) -> tuple[list[str], DictConfig, str]:
    """Stage `name`'s overrides (those of its record: without the labels), its config composed from them and the
    command line's `labels`, and the digest of its settings (composed without the labels)."""
    overrides = stage_overrides(cfg, name, checkpoints, root / name)
    with config_module():
        stage_cfg = compose(config_name="train", overrides=overrides)
        digest = settings_digest(stage_cfg)
        if labels:
            stage_cfg = compose(config_name="train", overrides=[*overrides, *labels])
    return overrides, stage_cfg, digest


# a `{stage}` reference left in an override: one to a stage the pipeline does not have
STAGE_REFERENCE = re.compile(r"\{([A-Za-z_][\w.-]*)\}")


def check_pipeline(
    cfg: DictConfig, root: Path, labels: list[str]
) -> dict[str, tuple[list[str], DictConfig, str]]:
    """Raise `ConfigError` for a `pipeline` config that cannot run, before its first stage trains: the types of its
    settings, `pipeline.dir`, and each stage's overrides, composed as the stage will be (`compose_stage`; reads no
    data and builds no model). Returns each stage's composition, which the run uses: the checkpoint an override
    `{stage}` stands for is already known (`stage_checkpoint`)."""
    pipeline = cfg.pipeline
    reuse = pipeline.get("reuse")
    if not isinstance(reuse, bool):
        raise ConfigError(
            f"pipeline.reuse={reuse!r} must be a boolean: true (reuse the stages that finished with the same "
            "settings) or false (train every stage again)"
        )
    common = pipeline.get("common", [])
    if not isinstance(common, (ListConfig, list)):
        raise ConfigError(
            f"pipeline.common={common!r} must be a list of overrides given to every stage, e.g. "
            "'pipeline.common=[\"trainer.max_steps=3\"]'"
        )
    stages = pipeline.get("stages")
    if not isinstance(stages, DictConfig):
        raise ConfigError(
            f"pipeline.stages={stages!r} must map each stage's name to its list of overrides, e.g. "
            "pipeline.stages.autoencoder=[experiment=shapes_autoencoder]"
        )
    if not stages:
        raise ConfigError(
            "pipeline.stages is empty: the pipeline has no stage to run; keep at least one, or train a single "
            "run with experiment=NAME (e.g. experiment=shapes_autoencoder)"
        )
    for name, items in stages.items():
        if not isinstance(items, ListConfig):
            raise ConfigError(
                f"pipeline.stages.{name}={items!r} must be a list of overrides, e.g. "
                f"'pipeline.stages.{name}=[\"experiment=shapes_autoencoder\"]'"
            )
    in_the_way = file_in_the_way(root)
    if in_the_way is not None:
        raise ConfigError(
            f"pipeline.dir={root}: {in_the_way} is a file, not a folder, so the stages' folders cannot be made "
            "there; set pipeline.dir to a folder"
        )
    parser = OverridesParser.create()
    checkpoints: dict[str, str] = {}
    composed = {}
    for name, items in stages.items():
        key = f"pipeline.stages.{name}"
        overrides = stage_overrides(cfg, name, checkpoints, root / name)
        # the stage's own overrides, then pipeline.common's, each with its `{stage}` references filled in
        for i, item in enumerate(overrides[: len(items) + len(common)]):
            try:
                parser.parse_override(item)
            except HydraException as e:
                where = key if i < len(items) else "pipeline.common"
                unknown = [ref for ref in STAGE_REFERENCE.findall(item) if ref not in stages]
                if unknown:
                    raise ConfigError(
                        f"{where}: {item!r} refers to stage {unknown[0]!r}, which this pipeline does not have; "
                        f"its stages: {list(stages)}"
                    ) from e
                raise ConfigError(f"{where}: {item!r} is not an override (key=value): {e}") from e
        try:
            composed[name] = compose_stage(cfg, name, checkpoints, root, labels)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"{key} (its overrides, then pipeline.common's): {e}") from e
        if is_pipeline(composed[name][1]):
            raise ConfigError(f"{key} must select a stage's experiment (experiment=NAME)")
        try:  # the training run's checks, but for the checkpoints the earlier stages have yet to write
            check_train_config(composed[name][1], pending=set(checkpoints.values()))
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        checkpoints[name] = stage_checkpoint(root, name)
    return composed


def run_pipeline(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Run (or reuse) every stage in order; write the summary to `pipeline.dir`; return the merged metrics."""
    from imagen.cli.train import train  # the stages are ordinary runs

    check_command_line()
    check_launcher()
    root = pipeline_root(cfg)
    labels = label_overrides()
    checkpoints: dict[str, str] = {}
    rows, metrics, objects = [], {}, {}
    writer, launch = launching_process(), launch_id()
    composed = check_pipeline(cfg, root, labels)  # every stage, before the first one trains
    source = source_digest()  # the code and configs that train: a reused stage trained by others is named
    for name in cfg.pipeline.stages:
        run_dir = root / name
        overrides, stage_cfg, digest = composed[name]
        inputs = upstream_checkpoints(cfg, name, checkpoints)
        if writer:  # decides, and records the decision with this command's launch id for the other processes
            if cfg.pipeline.reuse:
                restore_previous(run_dir, overrides, digest, inputs)
            reused = bool(cfg.pipeline.reuse) and finished(run_dir, overrides, digest, inputs)
            if reused:
                stamp_record(run_dir, launch)
            else:
                check_stage(stage_cfg, name)  # before anything in the stage's directory moves
                prepare_run_dir(
                    run_dir,
                    overrides,
                    digest,
                    inputs,
                    fresh=not cfg.pipeline.reuse,
                    launch=launch,
                    source=source,
                )
        else:
            wait_for_record(run_dir, overrides, digest, inputs, launch)
            reused = bool(cfg.pipeline.reuse) and finished(run_dir, overrides, digest, inputs)
            if not reused:
                check_stage(stage_cfg, name)
        start = time.time()
        older_code = False
        if reused:
            log.info(
                f"pipeline: stage {name} already finished in {run_dir}; reusing it (pipeline.reuse=false retrains)"
            )
            record = read_record(run_dir)
            stage_metrics, seconds = json.loads((run_dir / "metrics.json").read_text()), record["seconds"]
            older_code = record.get("source") != source
            if older_code and writer:
                why = (
                    "imagen/ or conf/ changed since (the source digest differs; the settings did not)"
                    if record.get("source")
                    else "its record, written by an earlier version, has no source digest"
                )
                log.warning(
                    f"pipeline: stage {name} in {run_dir} may have been trained by other code: {why}. Reused as it "
                    "is; pipeline.reuse=false trains every stage with this code"
                )
        else:
            log.info(f"pipeline: stage {name} -> {run_dir}")
            stage_metrics, stage_objects = train(stage_cfg)
            objects[name] = stage_objects
            if stage_objects.get("preempted"):  # its checkpoint is saved; the same command resumes it
                log.info(
                    f"pipeline: stage {name} was stopped by a signal; run the same command again to resume it"
                )
                return metrics, {"rows": rows, "grid": None, "stages": objects, "cfg": cfg, "preempted": True}
            seconds = time.time() - start
            record = {
                "overrides": overrides,
                "settings": digest,
                "inputs": inputs,
                "finished": True,
                "seconds": round(seconds, 1),
                "launch": launch,
                "source": source,
            }
            if writer:
                write_record(run_dir, record)
            if stage_objects.get("signalled") and name != list(cfg.pipeline.stages)[-1]:
                # the signal came in the stage's last validation: it is finished, and the next stage does not start
                log.info(
                    f"pipeline: a signal came as stage {name} finished; run the same command again to go on"
                )
                return metrics, {"rows": rows, "grid": None, "stages": objects, "cfg": cfg, "preempted": True}
        checkpoints[name] = stage_checkpoint(root, name)
        rows.append({"stage": name, "seconds": seconds, "reused": reused, "older_code": older_code,
                     "metrics": stage_metrics})  # fmt: skip
        # `test/psnr` from the autoencoder, `test/judge_acc` from the generator, ...: a later stage wins a clash
        metrics.update({k: v for k, v in stage_metrics.items() if not k.startswith("time/")})
        metrics.update({f"{name}/{k}": v for k, v in stage_metrics.items()})
    table = summary_table(rows)
    grid = latest_grid(root / list(cfg.pipeline.stages)[-1])
    text = table + (f"\n\nsample grid: {grid}" if grid else "\n\n(no sample grid was written)")
    if not writer:
        return metrics, {"rows": rows, "grid": grid, "stages": objects, "cfg": cfg}
    (root / "summary.md").write_text(text + "\n")
    for folder in {root, Path(cfg.paths.output_dir)}:  # the pipeline's folder and this run's directory
        folder.mkdir(parents=True, exist_ok=True)
        write_metrics(metrics, folder / "metrics.json")
    print(text, flush=True)  # the table once on the console; the log records where it is
    log.info(f"pipeline summary written to {root / 'summary.md'}")
    return metrics, {"rows": rows, "grid": grid, "stages": objects, "cfg": cfg}


def check_stage(stage_cfg: DictConfig, name: str) -> None:
    """The checkpoints a stage starts from, written by the stages before it (`check_pipeline` checked the rest)."""
    try:
        check_input_checkpoints(stage_cfg)
    except ConfigError as e:
        raise ConfigError(f"pipeline.stages.{name}: {e}") from None


def is_pipeline(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "pipeline.stages") is not None
