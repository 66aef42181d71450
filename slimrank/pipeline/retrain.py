"""Retraining from a published bundle: new logs in, a re-distilled, re-pruned ranker out.

The bundle holds everything needed (split, ids, raw side features, the two-tower model and the
teacher), so retraining reads nothing else. New logs are appended to the training part; the
validation and test parts stay as they were, so the new ranker is compared on the same users
and items as the old one. Log rows whose user or item the bundle does not know are dropped
(the two-tower model and the id embeddings have no row for them), as are (user, item) pairs
already in the validation or test part (they would leak the answer into the features).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slimrank.bundle import Bundle, open_bundle
from slimrank.bundle.checksums import sha256_file
from slimrank.bundle.formats import write_json
from slimrank.bundle.manifest import MANIFEST
from slimrank.config import ConfigError
from slimrank.data.dataset import Interactions, Split
from slimrank.errors import DataError
from slimrank.pipeline import artifacts
from slimrank.pipeline.artifacts import DataArtifact
from slimrank.pipeline.cache import StepCache, StepOutput
from slimrank.pipeline.config import PipelineConfig
from slimrank.pipeline.inputs import InputDigests
from slimrank.pipeline.run import ImportedTeacher

log = logging.getLogger(__name__)


def find_bundle(name: str, bundles_root: str | Path) -> Bundle:
    """Return the verified bundle ``name``: a bundle directory, or a version under the root."""
    path = Path(name)
    if path.is_dir() and (path / "manifest.json").is_file():
        return open_bundle(path.parent, path.name)
    return open_bundle(bundles_root, name)


def bundle_config(bundle: Bundle) -> PipelineConfig:
    """Return the pipeline config recorded in a bundle's manifest."""
    data = {k: v for k, v in bundle.manifest.config.items() if k != "teacher_version"}
    try:
        return PipelineConfig.from_dict(data)
    except ConfigError as err:
        raise err.within(f"{bundle.path / 'manifest.json'} (config)") from None


def append_logs(data: DataArtifact, new: Any) -> tuple[DataArtifact, dict[str, int]]:
    """Return ``data`` with the known rows of the ``new`` dataset appended to its training part.

    Also returns counts of what was appended and dropped, and why.
    """
    from slimrank.data.dataset import IdMap

    split = data.split
    users = IdMap(data.user_ids).index(
        new.users.external(new.interactions.user), unknown="minus_one"
    )
    items = IdMap(data.item_ids).index(
        new.items.external(new.interactions.item), unknown="minus_one"
    )
    known = (users >= 0) & (items >= 0)
    held = split.valid_matrix() + split.test_matrix()
    held_out = np.zeros(len(users), dtype=bool)
    if known.any():
        held_out[known] = np.asarray(held[users[known], items[known]]).ravel() > 0
    keep = known & ~held_out
    inter = new.interactions
    extra = Interactions(users[keep], items[keep], inter.rating[keep], inter.timestamp[keep])
    train = Interactions(
        *(
            np.concatenate([getattr(split.train, f), getattr(extra, f)])
            for f in ("user", "item", "rating", "timestamp")
        )
    )
    counts = {
        "appended": int(keep.sum()),
        "dropped_unknown_id": int((~known).sum()),
        "dropped_in_valid_or_test": int(held_out.sum()),
    }
    if counts["dropped_unknown_id"] or counts["dropped_in_valid_or_test"]:
        log.warning("new logs: %s", counts)
    new_split = Split(train, split.valid, split.test, split.n_users, split.n_items)
    return dataclasses.replace(data, split=new_split), counts


def import_bundle(
    bundle: Bundle, logs: str | Path, cache: StepCache
) -> tuple[dict[str, StepOutput], ImportedTeacher, dict[str, int]]:
    """Return the bundle's data (with ``logs`` appended) and two-tower model as step outputs.

    Also returns the bundle's teacher and the counts of appended and dropped log rows.
    """
    from slimrank.data.logs import load_logs

    logs = Path(logs)
    counts: dict[str, int] = {}

    def write_data(out: Path) -> None:
        base = DataArtifact.load(bundle.path / "data")
        data, found = append_logs(base, load_logs(logs))
        if not found["appended"]:  # retraining on the same data would publish nothing new
            raise DataError(
                f"no row can be appended to bundle {bundle.version}'s training part: "
                f"{found['dropped_unknown_id']} name a user or item the bundle does not know, "
                f"{found['dropped_in_valid_or_test']} are held out in its valid or test part",
                path=logs,
            )
        counts.update(found)
        data.save(out)
        write_json(out / "retrain.json", {"bundle": bundle.version, **found})

    files = InputDigests(cache.root).digest([logs])  # keyed by content, not by path
    # Keyed by content: two stores sharing a cache can hold different bundles of one name.
    key = {"bundle": bundle.version, "manifest": sha256_file(bundle.path / MANIFEST)}
    data = cache.run("data", key, {}, write_data, files)
    if not counts:
        counts.update(json.loads((data.path / "retrain.json").read_text()))
        counts.pop("bundle", None)

    def write_model(out: Path) -> None:
        shutil.copytree(bundle.path / "two_tower", out / artifacts.TWO_TOWER)
        variants = bundle.manifest.metrics.get("variants", {})
        artifacts.save_metrics(out, variants.get("two_tower", {}))

    model = cache.run("two_tower", key, {}, write_model)
    parent = bundle.manifest.parent or f"teacher-of-{bundle.version}"
    teacher = ImportedTeacher(bundle.path / "teacher", parent)
    outputs = {"data": data, "two_tower": model}
    if (bundle.path / "catalog").is_dir():  # the items do not change: keep their catalog

        def write_catalog(out: Path) -> None:
            shutil.copytree(bundle.path / "catalog", out / artifacts.CATALOG)

        outputs["catalog"] = cache.run("catalog", key, {}, write_catalog)
    return outputs, teacher, counts
