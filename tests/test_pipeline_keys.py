"""Every step's cache key covers the config it reads: change it, and that step and what follows
re-run while the steps before it stay cached.

The steps, their inputs and the config each reads come from ``STEP_TABLE`` (the table
``run_pipeline`` runs), and the fields from the config itself, so a new step or field is
covered without editing this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny_pipeline import TinyRun, tiny_pipeline

from slimrank.bundle import open_bundle
from slimrank.config import ConfigError
from slimrank.pipeline.config import PipelineConfig, load_config
from slimrank.pipeline.retrain import bundle_config
from slimrank.pipeline.run import (
    HOLD_OUT_READS,
    NOT_IN_STEPS,
    STEP_TABLE,
    STEPS,
    Step,
    run_pipeline,
    step_digests,
)


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted path, value)`` of every leaf field of a ``to_dict`` tree."""
    if isinstance(value, dict):
        for name, sub in value.items():
            if name != "config_version":
                yield from _leaves(sub, f"{path}.{name}" if path else name)
    else:
        yield path, value


BASE = load_config("tiny")
# Values a string field may take: every string in the shipped configs and the defaults.
WORDS = sorted(
    {
        w
        for c in (BASE, load_config("pipeline"), PipelineConfig())
        for _, v in _leaves(c.to_dict())
        for w in (v if isinstance(v, list) else [v])
        if isinstance(w, str)
    }
)


def _variants(value: Any) -> list[Any]:
    """Other values of the same kind to try for one field (some may be out of range)."""
    if isinstance(value, bool):
        out: list[Any] = [not value]
    elif isinstance(value, int):
        out = [value + 1, value - 1, 2 * value + 1, value // 2, 2 * value]
    elif isinstance(value, float):
        out = [value * 0.5, value + 0.05, value * 1.5 + 0.1, 0.5]
    elif isinstance(value, str):
        out = [value + "x", *WORDS]
    elif isinstance(value, list):
        out = [value[:-1], list(reversed(value)), [*value, value[-1]] if value else [1]]
    elif value is None:
        out = [1, 0.5, "x"]
    else:
        out = []
    return [v for v in out if v != value or type(v) is not type(value)]


def _set(tree: dict, path: str, value: Any) -> dict:
    out = dict(tree)
    head, _, rest = path.partition(".")
    out[head] = _set(tree[head], rest, value) if rest else value
    return out


def _changed(path: str) -> PipelineConfig | None:
    """Return ``BASE`` with the field at ``path`` changed to a valid other value, if any."""
    tree = BASE.to_dict()
    value = dict(_leaves(tree))[path]
    for other in _variants(value):
        try:
            config = PipelineConfig.from_dict(_set(tree, path, other))
        except ConfigError:
            continue  # out of range or the wrong kind for this field: try the next
        if config != BASE:
            return config
    return None


def _under(leaf: str, path: str) -> bool:
    return leaf == path or leaf.startswith(path + ".")


def _downstream(names: set[str]) -> set[str]:
    """Return ``names`` and every step that reads their outputs, directly or not."""
    out = set(names)
    for step in STEP_TABLE:  # the table is in run order: inputs come first
        if out & set(step.inputs):
            out.add(step.name)
    return out


ALL_LEAVES = [path for path, _ in _leaves(BASE.to_dict())]


def test_every_config_field_is_in_some_step_key() -> None:
    """A field no step's key covers (the pruning section left out) would never re-run anything."""
    uncovered = [
        leaf
        for leaf in ALL_LEAVES
        if not any(_under(leaf, p) for step in STEP_TABLE for p in step.reads)
        and not any(_under(leaf, p) for p in NOT_IN_STEPS)
    ]
    assert uncovered == []
    assert [s.name for s in STEP_TABLE] == list(STEPS)
    for step in STEP_TABLE:  # reads name real fields, inputs real earlier steps
        assert step.reads and all(any(_under(leaf, p) for leaf in ALL_LEAVES) for p in step.reads)
        assert set(step.inputs) <= set(STEPS[: STEPS.index(step.name)])


@pytest.mark.parametrize("step", STEP_TABLE, ids=lambda s: s.name)
def test_changing_what_a_step_reads_reruns_it_and_what_follows_only(step: Step) -> None:
    before = step_digests(BASE)
    tried = 0
    for path in step.reads:
        leaves = [leaf for leaf in ALL_LEAVES if _under(leaf, path)]
        changed_any = 0
        for leaf in leaves:
            config = _changed(leaf)
            if config is None:
                continue  # no valid other value found for this field (e.g. a fixed choice)
            changed_any += 1
            after = step_digests(config)
            readers = {s.name for s in STEP_TABLE if any(_under(leaf, p) for p in s.reads)}
            expected = _downstream(readers)
            assert step.name in expected
            rerun = {name for name in STEPS if after[name] != before[name]}
            assert rerun == expected, f"changing {leaf}"
        assert changed_any, f"no field under {path} could be changed: the test would be empty"
        tried += changed_any
    assert tried >= len(step.reads)


def test_config_outside_every_step_reruns_nothing() -> None:
    before = step_digests(BASE)
    for leaf in ALL_LEAVES:
        if any(_under(leaf, p) for p in NOT_IN_STEPS):
            config = _changed(leaf)
            assert config is not None, leaf
            assert step_digests(config) == before, leaf


def test_what_decides_the_held_out_labels_is_in_the_two_towers_key_when_it_holds_some_out() -> None:
    """``candidates.hold_out_labels = "sampled"``: the two-tower trains on train minus the
    sampled users' target folds, so the folds' cut and sample re-run it; with "none" they
    do not (the key stays as it was)."""
    candidates = dataclasses.replace(BASE.candidates, hold_out_labels="sampled", sample_users=3)
    held = dataclasses.replace(BASE, candidates=candidates)
    before = step_digests(held)
    assert before["two_tower"] != step_digests(BASE)["two_tower"]
    changes = {
        "candidates.sample_users": {"sample_users": 4},
        "candidates.target_frac": {"target_frac": 0.3},
        "candidates.fold_seed": {"fold_seed": 1},
        "candidates.folds": {"folds": BASE.candidates.folds + 1},
    }
    assert set(changes) | {"candidates.hold_out_labels"} == set(HOLD_OUT_READS)
    for path, change in changes.items():
        config = dataclasses.replace(held, candidates=dataclasses.replace(candidates, **change))
        after = step_digests(config)
        assert {n for n in STEPS if after[n] != before[n]} == _downstream({"two_tower"}), path
        plain = dataclasses.replace(BASE, candidates=dataclasses.replace(BASE.candidates, **change))
        assert step_digests(plain)["two_tower"] == step_digests(BASE)["two_tower"], path


def test_a_gate_that_decides_otherwise_reruns_the_int8_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gate's code is not config, so its revision is in the int8 step's key: a cached
    decision of an older gate (one that accepted every layer in fp32) is not reused."""
    import slimrank.pipeline.run as run

    before = step_digests(BASE)
    monkeypatch.setattr(run, "GATE_REVISION", run.GATE_REVISION + 1)
    after = step_digests(BASE)
    assert {n for n in STEPS if after[n] != before[n]} == _downstream({"int8"})


def test_a_new_catalog_format_rebuilds_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog's file format is in its step's key: a catalog cached in an older format is
    built again, not shipped to servers that read only the new one."""
    import slimrank.pipeline.run as run

    before = step_digests(BASE)
    monkeypatch.setattr(run, "CATALOG_FORMAT", run.CATALOG_FORMAT + 1)
    after = step_digests(BASE)
    assert {n for n in STEPS if after[n] != before[n]} == _downstream({"catalog"}) == {"catalog"}


# -- one real rerun ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_pipeline(tmp_path_factory)


def test_changing_the_pruning_section_reruns_pruning_and_what_follows_for_real(
    tiny: TinyRun,
) -> None:
    seen: dict[str, Any] = {}

    def hook(name, output, seconds) -> None:
        if output is not None:
            seen[name] = output

    run_pipeline(tiny.config, hook)
    assert all(o.cached for o in seen.values())
    # The digests the real run used are the ones step_digests computes without running.
    assert {n: o.digest for n, o in seen.items()} == step_digests(tiny.config)
    base = {n: o.path for n, o in seen.items()}
    prune = dataclasses.replace(tiny.config.prune, final_sparsity=0.25)
    config = dataclasses.replace(tiny.config, prune=prune)
    seen.clear()
    run_pipeline(config, hook)
    rerun = [n for n, o in seen.items() if not o.cached]
    assert rerun == ["student_pruned", "pruned_taylor", "pruned_l1", "int8", "precision"]
    assert all(seen[n].path == base[n] for n in STEPS[: STEPS.index("student_pruned")])
    assert {n: o.digest for n, o in seen.items()} == step_digests(config)


def test_a_bundles_recorded_config_is_checked_naming_the_manifest(tiny: TinyRun) -> None:
    """retrain reads the config a bundle recorded: a wrong value there names the manifest."""
    bundle = open_bundle(tiny.bundles, tiny.version)
    assert bundle_config(bundle) == tiny.config
    student = {**bundle.manifest.config["student"], "seed": "x"}
    bad = dataclasses.replace(
        bundle,
        manifest=dataclasses.replace(
            bundle.manifest, config={**bundle.manifest.config, "student": student}
        ),
    )
    with pytest.raises(ConfigError) as err:
        bundle_config(bad)
    assert str(err.value) == (
        f"{bundle.path / 'manifest.json'} (config): "
        "student.seed: expected an integer, got a string ('x')"
    )


def test_every_step_declares_its_outputs_and_a_missing_one_stops_the_run(
    tiny: TinyRun, tmp_path: Path
) -> None:
    """The table says what each step leaves behind; the tiny run's directories hold it all, and
    a step that forgets one fails naming it instead of publishing a half output."""
    from slimrank.pipeline.run import check_outputs

    result = run_pipeline(tiny.config)
    for step in STEP_TABLE:
        assert step.outputs, f"{step.name} declares no outputs"
        check_outputs(step, result.path(step.name))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.json").write_text("{}")
    int8 = next(s for s in STEP_TABLE if s.name == "int8")
    with pytest.raises(RuntimeError, match=r"step int8 did not write gate\.json"):
        check_outputs(int8, partial)
