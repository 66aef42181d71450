"""Assemble a serving bundle from a pipeline run and publish it through the bundle store.

Bundle files (all pickle-free; ``serving.json`` says how they fit together)::

    serving.json                 the serving spec (slimrank.bundle.serving_spec): which file
                                 holds what, format 2
    ranker.onnx                  gated int8 ranker: "features" (M, F) float32 -> "scores" (M,)
    index/index.faiss            FAISS index over item_vectors (rows = dense item index)
    index/item_ids.npy           int64 dense item index of each FAISS id (identity)
    index/index.json             factory string, tuned search parameters, config, transform
    items.npy, users.npy         (I,), (U,) external ids (unicode); row = dense index
    item_vectors.npy             (I, d) float32 item tower outputs
    user_vectors.npy             (U, d) float32 user vectors pooling train + valid history
    popularity.npy               (I,) float32 interactions per item in train + valid
    features.safetensors         tables candidate features read (newest-first histories, top-K
                                 co-occurrence and EASE neighbours, side features)
    teacher/teacher.safetensors  the teacher (DCN-v2) weights, teacher/teacher.json its config
    two_tower/...                the two-tower model (safetensors + JSON config); serving runs
                                 its user tower for users known only by recent items
    data/...                     split, ids and raw side features, so retraining needs only
                                 the bundle
    catalog/...                  the search catalog (slimrank.search.catalog): BM25 text
                                 index, filterable item attributes, display titles
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from slimrank.bundle import publish
from slimrank.bundle.formats import read_npy, write_json, write_npy
from slimrank.bundle.serving_spec import SERVING_JSON, PipelineSpec, RankerSpec
from slimrank.pipeline.run import RunResult

log = logging.getLogger(__name__)


def variant_metrics(result: RunResult) -> dict[str, Any]:
    """Return ``{step: {"valid": {...}, "test": {...}}}`` of every evaluated variant."""
    keys = ("two_tower", "candidates", "teacher", "student_plain", "student_distill")
    keys += ("student_pseudo", "student_pruned", "pruned_taylor", "pruned_l1", "int8", "precision")
    out = {}
    for key in keys:
        m = result.metrics(key)
        out["retrieval" if key == "candidates" else key] = {
            view: m[view] for view in ("valid", "test")
        }
    return out


def _copytree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("step.json"))


def bundle_writer(result: RunResult) -> Callable[[Path], None]:
    """Return the function that writes the bundle files of ``result`` into a directory."""

    def write(out: Path) -> None:
        from slimrank.pipeline import artifacts
        from slimrank.pipeline.artifacts import (
            CandidatesArtifact,
            DataArtifact,
            EmbeddingsArtifact,
            Int8Artifact,
            TeacherArtifact,
        )
        from slimrank.retrieval.index_io import read_transform

        int8 = Int8Artifact.load(result.path("int8"))
        gate = int8.gate
        data = DataArtifact.load(result.path("data"))
        split = data.split
        emb = EmbeddingsArtifact.load(result.path("embeddings"))
        shutil.copyfile(int8.ranker, out / "ranker.onnx")
        _copytree(result.path("index") / artifacts.INDEX, out / "index")
        write_npy(out / "items.npy", np.asarray(data.item_ids).astype(str))
        write_npy(out / "users.npy", np.asarray(data.user_ids).astype(str))
        write_npy(out / "item_vectors.npy", emb.item.astype(np.float32))
        write_npy(out / "user_vectors.npy", emb.user["test"].astype(np.float32))
        seen = sp.csr_matrix(split.seen_for_test())
        write_npy(out / "popularity.npy", np.asarray(seen.sum(axis=0)).ravel().astype(np.float32))
        tables, layout = CandidatesArtifact.serving_files(result.path("candidates"))
        shutil.copyfile(tables, out / "features.safetensors")
        _copytree(TeacherArtifact.model_dir(result.path("teacher")), out / "teacher")
        _copytree(result.path("two_tower") / artifacts.TWO_TOWER, out / "two_tower")
        (out / "data").mkdir()
        for name in DataArtifact.FILES:
            shutil.copyfile(result.path("data") / name, out / "data" / name)
        catalog = None
        if "catalog" in result.outputs:
            _copytree(result.path("catalog") / artifacts.CATALOG, out / "catalog")
            catalog = "catalog"
        decision = gate["decisions"][gate["mode"]]
        spec = PipelineSpec(
            k=result.config.k,
            candidates=result.config.candidates.n,
            ranker=RankerSpec(
                file="ranker.onnx",
                input_dim=len(layout["feature_names"]),
                int8_mode=gate["mode"],
                fp32_nodes=tuple(decision["excluded_nodes"]),
            ),
            index_directory="index",
            user_ids="users.npy",
            user_vectors="user_vectors.npy",
            item_ids="items.npy",
            item_vectors="item_vectors.npy",
            popularity="popularity.npy",
            features_file="features.safetensors",
            features_layout=layout,
            user_tower="two_tower",
            teacher_version=result.teacher_version or "",
            catalog_directory=catalog,
            index_transform_norm=read_transform(out / "index"),
        )
        write_json(out / SERVING_JSON, spec.to_json())

    return write


def publish_run(
    result: RunResult, root: str | Path, report: dict[str, Any] | None = None
) -> str | None:
    """Publish ``result`` as a new current bundle version if the gate passed; return its name.

    A run whose int8 ranker failed the gate is not published at all (``None``): it has no
    ranker fit to serve, and the run's report keeps the evidence.
    """
    gate = result.gate()
    if not gate["accepted"]:
        log.warning("gate failed: not publishing")
        return None
    variants = variant_metrics(result)
    k = result.config.k
    # A few numbers first, so listings that flatten the metrics lead with what matters.
    headline = {
        f"int8_test_ndcg@{k}": variants["int8"]["test"][f"ndcg@{k}"],
        f"teacher_test_ndcg@{k}": variants["teacher"]["test"][f"ndcg@{k}"],
        "int8_over_teacher_valid": gate["decisions"][gate["mode"]]["ratio"],
    }
    metrics: dict[str, Any] = {"headline": headline, "variants": variants}
    if report is not None:
        metrics["report"] = report
    config = {**result.config.to_dict(), "teacher_version": result.teacher_version}
    return publish(
        root,
        bundle_writer(result),
        config=config,
        metrics=metrics,
        gate=gate,
        parent=result.teacher_version,
        make_current=True,
    )


def read_serving(bundle_dir: Path) -> PipelineSpec:
    """Return a bundle's serving spec."""
    return PipelineSpec.from_json(json.loads((bundle_dir / SERVING_JSON).read_text()))


def load_bundle_tables(bundle_dir: Path) -> Any:
    """Return the :class:`FeatureTables` of a bundle (for checks and evaluation)."""
    from slimrank.ranking.feature_io import load_tables

    spec = read_serving(bundle_dir)
    return load_tables(
        bundle_dir / spec.features_file,
        spec.features_layout,
        read_npy(bundle_dir / spec.user_vectors),
        read_npy(bundle_dir / spec.item_vectors),
    )
