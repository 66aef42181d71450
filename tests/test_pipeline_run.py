"""The whole offline pipeline on a tiny synthetic catalog: publish, cache, gate, retrain.

One pipeline run (module fixture) is shared; each test checks the store's state before and
after what it does, so the order the tests run in does not matter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slimrank.bundle import current_version, list_versions, open_bundle
from slimrank.cli import main
from slimrank.compression.scorer import onnx_score_fn
from slimrank.pipeline.artifacts import DataArtifact, load_view
from slimrank.pipeline.config import load_config
from slimrank.pipeline.publish import load_bundle_tables, read_serving
from slimrank.pipeline.run import STEPS, cached_step_paths, run_pipeline
from slimrank.ranking.features import candidate_features
from slimrank.ranking.pipeline_eval import pipeline_metrics
from slimrank.serving.featurizer import RequestFeaturizer
from slimrank.serving.snapshot import Retrieved, UserQuery, UserSource

TINY = Path(__file__).resolve().parent.parent / "slimrank" / "configs" / "tiny.toml"


@dataclasses.dataclass(frozen=True)
class Run:
    cache: Path
    bundles: Path
    out: Path
    version: str
    exit_code: int


def _args(cache: Path, bundles: Path, out: Path) -> list[str]:
    return ["--cache-dir", str(cache), "--bundles", str(bundles), "--out", str(out)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("pipeline")
    cache, bundles, out = root / "cache", root / "bundles", root / "out"
    code = main(["pipeline", "--config", str(TINY), *_args(cache, bundles, out)])
    return Run(cache, bundles, out, current_version(bundles) or "", code)


def _config(run: Run):
    return dataclasses.replace(load_config(TINY), cache_dir=str(run.cache))


def test_pipeline_publishes_a_bundle_that_verifies(run: Run) -> None:
    assert run.exit_code == 0
    assert list_versions(run.bundles)[:1] == [run.version]
    bundle = open_bundle(run.bundles, run.version)  # verifies every checksum
    manifest = bundle.manifest
    assert manifest.parent is not None and manifest.parent.startswith("teacher-")
    assert manifest.gate["accepted"] is True
    assert set(manifest.metrics["variants"]) >= {"teacher", "student_distill", "int8"}
    # The headline listings lead with: the steps' own test NDCG and the gate's ratio.
    result = run_pipeline(_config(run))
    decision = manifest.gate["decisions"][manifest.gate["mode"]]
    assert manifest.metrics["headline"] == {
        "int8_test_ndcg@10": result.metrics("int8")["test"]["ndcg@10"],
        "teacher_test_ndcg@10": result.metrics("teacher")["test"]["ndcg@10"],
        "int8_over_teacher_valid": decision["ratio"],
    }
    assert decision["ratio"] == pytest.approx(
        result.metrics("int8")["valid"]["ndcg@10"] / result.metrics("teacher")["valid"]["ndcg@10"]
    )
    for name in ("ranker.onnx", "items.npy", "users.npy", "user_vectors.npy", "serving.json"):
        assert name in manifest.files
    assert "teacher/teacher.safetensors" in manifest.files
    assert read_serving(bundle.path).catalog_directory == "catalog"
    assert {"catalog/catalog.json", "catalog/catalog.safetensors"} <= set(manifest.files)
    # The report: a table with the eleven variants, the comparison with 3 pipeline rows and 5
    # peers (ALS too: make install has the peers extra), and a PNG plot.
    table, comparison = (run.out / "compression.md").read_text().split("## Quality under")
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 11
    assert sum(line.startswith("| ") for line in comparison.splitlines()) == 1 + 3 + 5
    n = 30  # tiny.toml's [candidates] n: the retrieval row names the candidates it was given
    # ... and the index the run built (tiny's catalog is under index.flat_below: exact search).
    index_dir = cached_step_paths(_config(run))["index"]
    index = json.loads((index_dir / "index" / "index.json").read_text())
    factory = index["factory_string"]
    assert factory == "Flat" and index.get("transform") is None
    assert f"| two-tower retrieval alone ({factory}, {n} candidates) |" in comparison
    assert "| params | sparsity | FLOPs | bytes |" in table
    assert (run.out / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_compares_under_equal_information_paired_over_the_same_users(run: Run) -> None:
    from slimrank.evaluation.peers import PEERS, format_params, score_part

    report = json.loads((run.out / "compression.json").read_text())
    by_key = {r["key"]: r for r in report["rows"]}
    rows = {r["name"]: r for r in report["comparison"]["rows"]}
    served = rows["pipeline, pruned int8 student (served)"]
    # The per-user means that are paired are the step's own test metrics.
    assert served["test_ndcg"] == pytest.approx(by_key["int8"]["ndcg"], abs=1e-9)
    assert rows["pipeline, teacher fp32"]["test_ndcg"] == pytest.approx(
        by_key["teacher"]["ndcg"], abs=1e-9
    )
    # Every table row's paired difference to the teacher is the difference of the steps' own
    # test metrics (the same users on both sides), and its interval holds it.
    for key, row in by_key.items():
        if key == "teacher":
            assert row["vs_teacher"] is None
            continue
        diff, low, high = row["vs_teacher"]
        assert diff == pytest.approx(row["ndcg"] - by_key["teacher"]["ndcg"], abs=1e-9)
        assert low <= diff <= high
    # Every pruning method reaches the same sparsity on the same shrunk student; fp16 weights
    # shrink the file; the precision search keeps a plan that passed the gate.
    for key in ("pruned_taylor", "pruned_l1"):
        assert by_key[key]["sparsity"] == pytest.approx(by_key["student_pruned"]["sparsity"])
        assert by_key[key]["params"] == by_key["student_pruned"]["params"]
    assert by_key["fp16"]["bytes"] < by_key["student_pruned"]["bytes"]
    search = report["precision"]
    assert search["accepted"] and search["results"][search["chosen"]]["passed"]
    assert len(search["results"]) == 3 ** len(search["plan"])
    assert report["cpu"]["vnni"] in (True, False, None)
    # The seed spread: the distilled student's own seed, then the others, each its test NDCG.
    seeds = report["seeds"]["test_ndcg"]
    assert seeds[str(_config(run).student.seed)] == by_key["student_distill"]["ndcg"]
    assert len(seeds) >= 2 and report["seeds"]["spread"] >= 0
    # Each peer's row is its chosen setting refitted on train + valid, recomputed here.
    split = DataArtifact.load(run_pipeline(_config(run)).path("data")).split
    for peer in PEERS:
        row = rows[peer.name]
        chosen = next(p for p in peer.settings() if format_params(p) == row["selected"])
        metrics, _ = score_part(peer.fit, chosen, split, "test")
        assert row["test_ndcg"] == pytest.approx(metrics["ndcg@10"], abs=1e-9)
        ci = row["served_minus"]
        assert ci["diff"] == pytest.approx(served["test_ndcg"] - row["test_ndcg"], abs=1e-9)
        assert ci["low"] <= ci["diff"] <= ci["high"]
        assert ci["users"] == metrics["users"]
    # The pipeline's own rows too: served minus that row, not the other way round.
    for name in ("pipeline, teacher fp32", next(n for n in rows if n.startswith("two-tower"))):
        ci = rows[name]["served_minus"]
        assert ci["diff"] == pytest.approx(served["test_ndcg"] - rows[name]["test_ndcg"], abs=1e-9)
    # The bar to clear is the peer (retrieval alone counts as one) with the highest test
    # NDCG@10, not the highest validation NDCG@10 nor the weakest.
    peers = [r for r in report["comparison"]["rows"] if r["peer"]]
    by_test = sorted(peers, key=lambda r: r["test_ndcg"], reverse=True)
    assert by_test[0]["test_ndcg"] > by_test[1]["test_ndcg"]  # one strongest, no tie
    assert report["comparison"]["strongest_peer"] == by_test[0]["name"]
    markdown = (run.out / "compression.md").read_text()
    assert f"Strongest peer (highest test NDCG@10): {by_test[0]['name']}." in markdown


def test_report_sparsity_and_flops_match_what_the_steps_recorded(run: Run) -> None:
    """Read from the served ONNX files, they equal the torch counts the steps wrote."""
    rows = {r["key"]: r for r in json.loads((run.out / "compression.json").read_text())["rows"]}
    result = run_pipeline(_config(run))
    pruned = json.loads((result.path("student_pruned") / "model.json").read_text())
    distill = json.loads((result.path("student_distill") / "model.json").read_text())
    assert rows["retrieval"]["sparsity"] is None and rows["retrieval"]["flops"] is None
    assert rows["student_distill"]["flops"] == distill["flops_per_candidate"]
    assert rows["student_distill"]["sparsity"] == 0.0
    assert rows["student_pruned"]["flops"] == pruned["flops_per_candidate"]
    assert rows["student_pruned"]["sparsity"] == pytest.approx(pruned["sparsity"]["all"])
    assert rows["student_pruned"]["sparsity"] >= 0.4  # tiny.toml prunes to 0.5 but the last layer
    # int8 keeps the pruned layers' shapes and zeros (rounding may add a few zeros).
    assert rows["int8"]["flops"] == rows["student_pruned"]["flops"]
    assert rows["int8"]["sparsity"] >= rows["student_pruned"]["sparsity"]
    assert rows["teacher"]["flops"] > 5 * rows["student_distill"]["flops"]


def test_bundle_tables_reproduce_the_pipeline_features(run: Run) -> None:
    """Serving-time features from the bundle alone equal the test view the ranker was judged on."""
    bundle = open_bundle(run.bundles, run.version)
    tables = load_bundle_tables(bundle.path)
    result = run_pipeline(_config(run))
    cands, feats, _ = load_view(result.path("candidates") / "test.safetensors")
    again = candidate_features(tables, cands)
    assert again.names == feats.names
    np.testing.assert_allclose(again.values, feats.values, rtol=1e-6, atol=1e-6)
    # The bundle's ranker on those features gives exactly the int8 metrics the run reported.
    scores = onnx_score_fn(bundle.file("ranker.onnx"))(again)
    truth = DataArtifact.load(bundle.path / "data").truth("test")
    assert pipeline_metrics(cands, scores, truth, (10,)) == result.metrics("int8")["test"]
    assert bundle.manifest.metrics["variants"]["int8"]["test"] == result.metrics("int8")["test"]
    serving = read_serving(bundle.path)
    assert serving.features_layout["feature_names"] == list(feats.names)
    # One request at a time, as the server featurizes: the known user's row, the retrieved
    # rows and the scores the index gave them.
    featurize = RequestFeaturizer(tables)
    user_vectors = np.load(bundle.file("user_vectors.npy"), allow_pickle=False)
    for row in (0, len(cands) - 1):
        user, real = int(cands.user[row]), cands.mask[row]
        query = UserQuery(UserSource.KNOWN, user, user_vectors[user])
        got = featurize(query, Retrieved(cands.items[row][real], cands.retrieval_score[row][real]))
        np.testing.assert_array_equal(got, feats.values[row][real])
    assert serving.ranker.input_dim == feats.values.shape[-1]


def test_second_run_is_fully_cached(run: Run) -> None:
    seen: dict[str, bool] = {}

    def hook(name, output, seconds) -> None:
        if output is not None:
            seen[name] = output.cached

    run_pipeline(_config(run), hook)
    assert list(seen) == list(STEPS)
    assert all(seen.values()), seen


def test_gate_failure_publishes_nothing_and_exits_nonzero(run: Run, tmp_path: Path) -> None:
    before = list_versions(run.bundles)
    current = current_version(run.bundles)
    args = _args(run.cache, run.bundles, tmp_path / "out")
    code = main(["pipeline", "--config", str(TINY), "--min-ratio", "1.5", *args])
    assert code == 3
    assert list_versions(run.bundles) == before
    assert current_version(run.bundles) == current
    result = run_pipeline(
        dataclasses.replace(
            _config(run),
            int8=dataclasses.replace(
                _config(run).int8,
                gate=dataclasses.replace(_config(run).int8.gate, min_ratio=1.5),
            ),
        )
    )
    gate = result.gate()
    assert gate["accepted"] is False and gate["mode"] is None
    assert all(a["ratio"] < 1.5 for d in gate["decisions"].values() for a in d["attempts"])


def test_an_imported_teacher_rescores_only_the_features_it_was_trained_on(run: Run) -> None:
    """Re-scoring with the run's own teacher gives the scores it recorded; a teacher that
    expects other features is refused, naming --retrain-teacher."""
    from slimrank.pipeline.artifacts import CandidatesArtifact, TeacherArtifact, TeacherModel
    from slimrank.pipeline.steps import rescore_teacher_step

    result = run_pipeline(_config(run))
    data = DataArtifact.load(result.path("data"))
    candidates = CandidatesArtifact.load(result.path("candidates"))
    model = TeacherModel.load(TeacherArtifact.model_dir(result.path("teacher")), "teacher-x")
    again = rescore_teacher_step(model, 10, data, candidates)
    recorded = TeacherArtifact.load_scores(result.path("teacher"))
    for view in ("train", "valid", "test"):
        np.testing.assert_allclose(again.scores[view], recorded[view], rtol=1e-5, atol=1e-6)
    assert again.version == "teacher-x" and again.metrics["imported"] == "teacher-x"
    other = dataclasses.replace(model, feature_names=model.feature_names[::-1])
    with pytest.raises(ValueError, match="--retrain-teacher"):
        rescore_teacher_step(other, 10, data, candidates)


def _new_logs(run: Run, path: Path) -> int:
    """Write logs of unseen (user, item) pairs of known ids plus one unknown user."""
    data = DataArtifact.load(run_pipeline(_config(run)).path("data"))
    split = data.split
    seen = (split.train_matrix() + split.valid_matrix() + split.test_matrix()).toarray() > 0
    rng = np.random.default_rng(7)
    users, items = np.nonzero(~seen)
    pick = rng.choice(len(users), 40, replace=False)
    frame = pd.DataFrame(
        {
            "user_id": np.r_[data.user_ids[users[pick]], ["nobody"]],
            "item_id": np.r_[data.item_ids[items[pick]], [data.item_ids[0]]],
            "timestamp": 1_700_000_000 + np.arange(len(pick) + 1),
        }
    )
    frame.to_csv(path, index=False)
    return len(pick)


def test_retrain_publishes_a_version_naming_its_parent_teacher(run: Run, tmp_path: Path) -> None:
    logs = tmp_path / "new_logs.csv"
    n_new = _new_logs(run, logs)
    parent = open_bundle(run.bundles, run.version).manifest.parent
    before = list_versions(run.bundles)
    code = main(
        [
            "retrain",
            "--teacher",
            str(run.bundles / run.version),
            "--logs",
            str(logs),
            "--min-ratio",
            "0.5",  # this test is about lineage, not about the tiny ranker's quality
            *_args(run.cache, run.bundles, tmp_path / "out"),
        ]
    )
    assert code == 0
    new = current_version(run.bundles)
    assert new not in before and new in list_versions(run.bundles)
    bundle = open_bundle(run.bundles, new)
    assert bundle.manifest.parent == parent
    assert read_serving(bundle.path).teacher_version == parent
    # The teacher was reused, not retrained: same weights as the parent bundle's.
    old = open_bundle(run.bundles, run.version)
    assert (
        bundle.manifest.files["teacher/teacher.safetensors"].sha256
        == old.manifest.files["teacher/teacher.safetensors"].sha256
    )
    # The new training part holds exactly the known new interactions on top of the old ones.
    old_train = DataArtifact.load(old.path / "data").split.train
    new_train = DataArtifact.load(bundle.path / "data").split.train
    assert len(new_train) == len(old_train) + n_new
    assert json.loads((bundle.path / "data" / "data.json").read_text())["train"] == len(new_train)
    # The items did not change, so the retrained bundle keeps the parent's search catalog.
    for name in ("catalog/catalog.json", "catalog/catalog.safetensors", "catalog/titles.npy"):
        assert bundle.manifest.files[name].sha256 == old.manifest.files[name].sha256
    assert read_serving(bundle.path).catalog_directory == "catalog"


def test_retrain_refuses_logs_with_no_row_it_can_append(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown ids and held-out pairs only: an error naming the file, and nothing published.

    Retraining on the unchanged data would publish a version that learned nothing new.
    """
    data = DataArtifact.load(run_pipeline(_config(run)).path("data"))
    test = data.split.test
    logs = tmp_path / "other_catalog.csv"
    pd.DataFrame(
        {
            "user_id": ["nobody", data.user_ids[0], data.user_ids[test.user[0]]],
            "item_id": [data.item_ids[0], "no-such-item", data.item_ids[test.item[0]]],
            "timestamp": [1_700_000_000, 1_700_000_001, 1_700_000_002],
        }
    ).to_csv(logs, index=False)
    before = (list_versions(run.bundles), current_version(run.bundles))
    args = ["retrain", "--teacher", str(run.bundles / run.version), "--logs", str(logs)]
    for _ in range(2):  # the refused data step left nothing behind to be mistaken for a cache
        capsys.readouterr()
        assert main([*args, *_args(run.cache, run.bundles, tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert str(logs) in err and "no row can be appended" in err
        assert "2 name a user or item the bundle does not know, 1 are held out" in err
    assert (list_versions(run.bundles), current_version(run.bundles)) == before


def test_pipeline_and_retrain_find_the_store_in_slimrank_bundles(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``--bundles`` they use ``$SLIMRANK_BUNDLES``, the root ``serve`` watches."""
    store = tmp_path / "store"
    monkeypatch.setenv("SLIMRANK_BUNDLES", str(store))
    monkeypatch.chdir(tmp_path)  # where ./bundles would be
    args = ["--cache-dir", str(run.cache), "--out", str(tmp_path / "out")]
    assert main(["pipeline", "--config", str(TINY), *args]) == 0  # cached: publishes only
    version = current_version(store)
    assert version is not None and not (tmp_path / "bundles").exists()
    logs = tmp_path / "new_logs.csv"
    _new_logs(run, logs)
    retrain = ["retrain", "--teacher", version, "--logs", str(logs), "--min-ratio", "0.5"]
    # The bundle is found by version name in the store; --retrain-teacher trains a new teacher
    # on the appended data instead of re-scoring with the bundle's.
    assert main([*retrain, "--retrain-teacher", *args]) == 0
    assert len(list_versions(store)) == 2 and not (tmp_path / "bundles").exists()
    old, new = open_bundle(store, version), open_bundle(store, current_version(store) or "")
    assert new.manifest.parent is not None and new.manifest.parent.startswith("teacher-")
    assert new.manifest.parent != old.manifest.parent
    assert read_serving(new.path).teacher_version == new.manifest.parent


def test_retrain_keys_a_bundle_by_its_content_not_its_name(run: Run, tmp_path: Path) -> None:
    """Two stores sharing a cache may each hold a version of the same name; the second's data
    step must not be the first's (before, the key was the version name alone)."""
    import shutil

    from slimrank.pipeline.cache import StepCache
    from slimrank.pipeline.retrain import import_bundle

    logs = tmp_path / "new_logs.csv"
    _new_logs(run, logs)
    cache = StepCache(tmp_path / "cache")
    first, _, _ = import_bundle(open_bundle(run.bundles, run.version), logs, cache)
    other = tmp_path / "other_store" / run.version
    shutil.copytree(run.bundles / run.version, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["metrics"]["note"] = "another store's bundle of the same name"
    (other / "manifest.json").chmod(0o644)
    (other / "manifest.json").write_text(json.dumps(manifest))
    second, _, _ = import_bundle(open_bundle(other.parent, run.version), logs, cache)
    assert not second["data"].cached and second["data"].digest != first["data"].digest
    again, _, _ = import_bundle(open_bundle(other.parent, run.version), logs, cache)
    assert again["data"].cached and again["data"].digest == second["data"].digest
