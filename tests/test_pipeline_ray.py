"""``--engine ray`` against the local engine (the reference) on the tiny pipeline.

Mining, features and teacher scores are deterministic: the Ray engine must reproduce them
(candidates exactly, floats within 1e-5). The students train data-parallel on two Ray Train
workers, so they only match in quality: the published bundle's int8 ranker keeps validation
NDCG@10 within ``NDCG_TOLERANCE`` of the local engine's. Skips when ray is not installed,
unless ``CI`` is set: there a missing ray is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from slimrank.pipeline.engine import EngineConfig

try:
    import ray
except ImportError:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("CI is set but ray is not installed: install the ray extra", pytrace=False)
    pytest.skip(
        "ray is not installed (pip install 'slimrank[ray]'); with CI set this fails",
        allow_module_level=True,
    )

from slimrank.bundle import current_version, open_bundle
from slimrank.cli import main
from slimrank.pipeline.artifacts import VIEWS, TeacherArtifact, load_view
from slimrank.pipeline.config import load_config
from slimrank.pipeline.run import RunResult, run_pipeline

TINY = Path(__file__).resolve().parent.parent / "slimrank" / "configs" / "tiny.toml"
# Two-worker DDP splits every batch in two; on the tiny config the int8 validation NDCG@10
# moved by 0.0003 to 0.003 from the local engine's in the runs we made.
NDCG_TOLERANCE = 0.02
WORKERS = 2
ENGINE = EngineConfig(kind="ray", workers=WORKERS, batch_users=16)  # 50 users: 4 batches


@dataclasses.dataclass(frozen=True)
class Runs:
    local: RunResult
    ray: RunResult
    bundles: Path
    exit_code: int


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("ray")
    config = load_config(TINY)
    local = run_pipeline(dataclasses.replace(config, cache_dir=str(root / "local")))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        args = ["pipeline", "--config", str(TINY), "--engine", "ray"]
        args += ["--ray-workers", str(WORKERS), "--ray-batch-users", str(ENGINE.batch_users)]
        args += ["--cache-dir", str(root / "ray"), "--bundles", str(root / "bundles")]
        code = main([*args, "--out", str(root / "out")])
        # Every step is cached by now; this only collects the run's outputs.
        on_ray = run_pipeline(
            dataclasses.replace(config, cache_dir=str(root / "ray")), engine=ENGINE
        )
    finally:
        ray.shutdown()
    return Runs(local, on_ray, root / "bundles", code)


def test_ray_engine_mines_the_local_candidates_and_features(runs: Runs) -> None:
    for view in VIEWS:
        name = f"{view}.safetensors"
        cands, feats, labels = load_view(runs.local.path("candidates") / name)
        r_cands, r_feats, r_labels = load_view(runs.ray.path("candidates") / name)
        np.testing.assert_array_equal(r_cands.user, cands.user)
        np.testing.assert_array_equal(r_cands.items, cands.items)
        np.testing.assert_allclose(r_cands.retrieval_score, cands.retrieval_score, atol=1e-6)
        assert r_feats.names == feats.names
        np.testing.assert_allclose(r_feats.values, feats.values, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(r_labels, labels)


def test_ray_engine_scores_like_the_local_teacher(runs: Runs) -> None:
    local = TeacherArtifact.load_scores(runs.local.path("teacher"))
    on_ray = TeacherArtifact.load_scores(runs.ray.path("teacher"))
    assert set(on_ray) == set(local) == set(VIEWS)
    for view in VIEWS:
        real = np.isfinite(local[view])  # -inf marks padded candidates
        np.testing.assert_array_equal(np.isfinite(on_ray[view]), real)
        np.testing.assert_allclose(on_ray[view][real], local[view][real], rtol=1e-5, atol=1e-5)


def test_students_train_on_ray_train_workers(runs: Runs) -> None:
    for step in ("student_plain", "student_distill"):
        epochs = json.loads((runs.ray.path(step) / "model.json").read_text())["epochs"]
        assert epochs and all(e["workers"] == WORKERS for e in epochs)
        local = json.loads((runs.local.path(step) / "model.json").read_text())["epochs"]
        assert all("workers" not in e for e in local)
    # Deterministic steps share the cache across engines; multi-worker students do not.
    for step in ("candidates", "teacher"):
        assert runs.ray.outputs[step].digest == runs.local.outputs[step].digest
    for step in ("student_plain", "student_distill", "int8"):
        assert runs.ray.outputs[step].digest != runs.local.outputs[step].digest


def test_ray_bundle_matches_local_quality(runs: Runs) -> None:
    assert runs.exit_code == 0
    bundle = open_bundle(runs.bundles, current_version(runs.bundles) or "")  # verifies
    variants = bundle.manifest.metrics["variants"]
    assert variants["int8"]["valid"] == runs.ray.metrics("int8")["valid"]
    for step in ("student_distill", "int8"):
        local = runs.local.metrics(step)["valid"]["ndcg@10"]
        on_ray = runs.ray.metrics(step)["valid"]["ndcg@10"]
        assert abs(on_ray - local) <= NDCG_TOLERANCE, (step, on_ray, local)


def test_engine_config_rejects_ray_options_without_ray() -> None:
    with pytest.raises(ValueError, match="kind"):
        EngineConfig(kind="spark")
    with pytest.raises(ValueError, match="ray engine"):
        EngineConfig(kind="local", workers=2)
    with pytest.raises(ValueError, match="ray engine"):  # --ray-address is not dropped silently
        EngineConfig(kind="local", address="auto")
    with pytest.raises(ValueError, match="workers"):
        EngineConfig(kind="ray", workers=0)
    with pytest.raises(ValueError, match="batch_users"):
        EngineConfig(kind="ray", batch_users=0)
    assert EngineConfig().cache_key() == {}
    assert EngineConfig(kind="ray", workers=3).cache_key() == {"train_workers": 3}


@pytest.mark.parametrize("transform", ["none", "mips_l2"])
def test_shipped_ivfpq_index_searches_like_the_original(transform: str) -> None:
    """FAISS indexes do not pickle; their serialized bytes (and tuned params, and the MIPS-to-L2
    transform's norm) travel instead."""
    import pickle

    from slimrank.pipeline.ray_engine import ShippedIndex
    from slimrank.retrieval.index import IndexConfig, build_index

    rng = np.random.default_rng(0)
    items = rng.standard_normal((3000, 32)).astype(np.float32)  # (I, d)
    queries = rng.standard_normal((100, 32)).astype(np.float32)  # (Q, d)
    config = IndexConfig(pq_m=16, transform=transform)
    index = build_index(items, config, tune_queries=queries, progress=False)
    again = pickle.loads(pickle.dumps(ShippedIndex.of(index))).load()
    assert again.factory_string == index.factory_string and again.params == index.params
    assert again.transform == index.transform == transform
    for got, want in zip(again.search(queries, 50), index.search(queries, 50), strict=True):
        np.testing.assert_array_equal(got, want)
