"""The serving contract: PipelineSpec round-trips, and every malformed field is named."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest

from slimrank.bundle import BundleError
from slimrank.bundle.serving_spec import PIPELINE_FORMAT, PLAIN_FORMAT, PipelineSpec, RankerSpec

SERVING = Path(__file__).resolve().parent.parent / "slimrank" / "serving"


def spec(norm: float | None = None) -> PipelineSpec:
    return PipelineSpec(
        k=10,
        candidates=200,
        ranker=RankerSpec("ranker.onnx", 3, "weights", ("MatMul_1",)),
        index_directory="index",
        user_ids="users.npy",
        user_vectors="user_vectors.npy",
        item_ids="items.npy",
        item_vectors="item_vectors.npy",
        popularity="popularity.npy",
        features_file="features.safetensors",
        features_layout={"n_users": 5, "n_items": 7, "feature_names": ["a", "b", "c"]},
        user_tower="two_tower",
        teacher_version="teacher-1",
        index_transform_norm=norm,
    )


def test_round_trip_and_no_code_paths() -> None:
    data = spec().to_json()
    assert PipelineSpec.from_json(copy.deepcopy(data)) == spec()
    # Without an index transform the spec stays format 2, which servers before it read.
    assert data["format"] == PLAIN_FORMAT == 2 and "transform" not in data["index"]
    text = repr(data)
    assert "slimrank." not in text  # names files, never modules


def test_the_index_transform_round_trips_as_format_3() -> None:
    data = spec(10.96).to_json()
    assert data["format"] == PIPELINE_FORMAT == 3
    assert data["index"]["transform"] == {"kind": "mips_l2", "max_norm": 10.96}
    assert PipelineSpec.from_json(copy.deepcopy(data)) == spec(10.96)


def _transformed() -> dict:
    return spec(10.96).to_json()


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (_transformed() | {"format": 4}, "format 4"),
        ({**_transformed(), "index": {"directory": "index"}}, "[index]['transform']: missing"),
        (
            {**spec().to_json(), "index": _transformed()["index"]},
            "[index]['transform'] = {'kind': 'mips_l2', 'max_norm': 10.96}: format 2",
        ),
    ],
)
def test_a_transform_the_format_does_not_match_is_refused(data: dict, named: str) -> None:
    with pytest.raises(BundleError) as info:
        PipelineSpec.from_json(data, "bundle v1: serving.json")
    assert named in str(info.value) and "bundle v1: serving.json" in str(info.value)


@pytest.mark.parametrize(
    ("transform", "named"),
    [
        ({"kind": "mips", "max_norm": 1.0}, "[index]['transform']['kind'] = 'mips'"),
        ({"kind": "mips_l2"}, "[index]['transform']['max_norm'] = None"),
        ({"kind": "mips_l2", "max_norm": -1.0}, "[index]['transform']['max_norm'] = -1.0"),
        ({"kind": "mips_l2", "max_norm": "3"}, "[index]['transform']['max_norm'] = '3'"),
        ({"kind": "mips_l2", "max_norm": True}, "[index]['transform']['max_norm'] = True"),
        ({"kind": "mips_l2", "max_norm": float("nan")}, "[index]['transform']['max_norm'] = nan"),
        ({"kind": "mips_l2", "max_norm": 2.0, "scale": 1}, "unknown field(s) ['scale']"),
        ("mips_l2", "[index]['transform']: expected an object"),
    ],
)
def test_a_bad_transform_field_is_named(transform, named: str) -> None:
    data = _transformed()
    data["index"]["transform"] = transform
    with pytest.raises(BundleError) as info:
        PipelineSpec.from_json(data, "bundle v1: serving.json")
    assert named in str(info.value) and "bundle v1: serving.json" in str(info.value)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d.update(format=1), "format 1"),
        (lambda d: d.update(kind="flat"), "kind 'flat'"),
        (lambda d: d.update(k="10"), "['k']"),
        (lambda d: d.update(candidates=True), "['candidates']"),
        (lambda d: d.update(candidates=0), "candidates 0"),
        (lambda d: d.pop("ranker"), "['ranker']"),
        (lambda d: d["ranker"].update(file="../../etc/passwd"), "[ranker]['file']"),
        (lambda d: d["ranker"].update(file="/abs.onnx"), "[ranker]['file']"),
        (lambda d: d["ranker"].update(input_dim=4), "takes 4 features"),
        (lambda d: d["users"].update(vectors=None), "[users]['vectors']"),
        (lambda d: d["features"].update(n_items="7"), "[features]['n_items']"),
        (lambda d: d["features"].pop("feature_names"), "[features]['feature_names']"),
        (lambda d: d["index"].update(directory="a/./b"), "[index]['directory']"),
        # The optional directories stay inside the bundle too.
        (lambda d: d["users"].update(tower="../other/two_tower"), "[users]['tower']"),
        (lambda d: d.update(catalog={"directory": "/srv/catalog"}), "[catalog]['directory']"),
        (lambda d: d.update(catalog={}), "[catalog]['directory']"),
    ],
)
def test_malformed_fields_are_named(edit, named: str) -> None:
    data = spec().to_json()
    edit(data)
    with pytest.raises(BundleError) as info:
        PipelineSpec.from_json(data, "bundle v1: serving.json")
    assert named in str(info.value) and "bundle v1: serving.json" in str(info.value)


def test_not_an_object() -> None:
    with pytest.raises(BundleError, match="JSON object"):
        PipelineSpec.from_json([1, 2])


def test_serving_never_imports_the_offline_pipeline() -> None:
    """Online code imports the domain cores, never slimrank.pipeline (read from the source)."""
    offenders = []
    for path in sorted(SERVING.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("slimrank.pipeline")]
    assert offenders == []
