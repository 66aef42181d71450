"""Rank-time blend of the served int8 ranker with ALS (and EASE): does it pay on validation?

Issue 15 asks the served pipeline to beat the strongest peer, ALS (``ALS_SMALL``), by 0.01
test NDCG@10. A blend with EASE at rank time gave +0.0016 on validation (README, "Tried on
validation, not kept"); ALS, a different model family, was never blended. For each view the
served ranker's scores of the pipeline's 200 candidates (the cached int8 ONNX file, as the
comparison step scores them) and a peer's scores of the same candidates are standardized per
user over the user's candidates and summed, ``served + w * peer``. The peers read what the
view allows (``observed_interactions``): fitted on train for the validation view, on train +
valid for the test view, at the setting the peer evaluation chooses on validation (ALS:
``evaluate_peer(ALS_SMALL)``, ``random_state = 0``; EASE: l2 chosen from its grid). Rows:

- ALS alone blended, w in ``WEIGHTS``; EASE alone blended (the control: +0.0016 at w = 0.25
  before); three-way ``served + w1 * ALS + w2 * EASE`` on ``ALS_GRID`` x ``EASE_GRID``;
- every row's validation NDCG@10 and a paired bootstrap interval against served (2,000
  resamples over the 943 users); the setting is chosen on validation only (the best of all
  rows, and the best ALS-only w), and only then its test NDCG@10 is computed, paired against
  served, the ALS peer and the EASE peer (both ranking every item, as the comparison table's
  rows do; 10,000 resamples there, as the table);
- the chosen blends again with ALS ``random_state`` 0-4 (same w), valid and test.

Reads the cached steps of ``slimrank pipeline --config pipeline`` (``make demo``); trains
nothing of the pipeline (it stops if a step is not in the cache)::

    .venv/bin/python bench/peer_blend.py [--config pipeline] [--ranker served|weights|dynamic]
                                         [--out peer_blend]   # about 1 minute on 2 cores

``--ranker``: which int8 file of the cached int8 step blends (default: the one its gate
served; ``weights`` is the weight-only file, which the README's table served). Writes
``bench/results/OUT.md`` (default ``peer_blend.md``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.bundle.checksums import sha256_file  # noqa: E402
from slimrank.evaluation.paired import PairedInterval, PerUser, paired_bootstrap  # noqa: E402
from slimrank.evaluation.peers import (  # noqa: E402
    ALS_SMALL,
    PEERS,
    PeerResult,
    evaluate_peer,
    format_params,
    observed_interactions,
    score_part,
)
from slimrank.evaluation.protocol import ScoreFn  # noqa: E402
from slimrank.pipeline.artifacts import DataArtifact  # noqa: E402
from slimrank.pipeline.cache import StepOutput  # noqa: E402
from slimrank.pipeline.comparison import variant_per_user  # noqa: E402
from slimrank.pipeline.config import load_config, resolve_config  # noqa: E402
from slimrank.pipeline.run import RunResult, cached_step_paths  # noqa: E402
from slimrank.ranking.candidates import Candidates  # noqa: E402
from slimrank.ranking.pipeline_eval import pipeline_per_user  # noqa: E402

RESULTS = HERE / "results"
WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # served + w * peer
ALS_GRID = (0.25, 0.5, 0.75, 1.0, 1.5)  # three-way: served + w1 * ALS + w2 * EASE
EASE_GRID = (0.1, 0.25, 0.5)
SEEDS = (0, 1, 2, 3, 4)  # ALS random_state for the chosen blends
VALID_RESAMPLES = 2_000
TEST_RESAMPLES = 10_000  # as the comparison table


def cached_run(config_name: str) -> RunResult:
    """Return the cached run of ``config_name``; exit if any step is not in the cache (this
    bench never trains a step of the pipeline)."""
    config = load_config(resolve_config(config_name))
    paths = cached_step_paths(config)
    missing = [name for name, path in paths.items() if not path.is_dir()]
    if missing:
        raise SystemExit(f"not in the step cache: {missing}; run make demo first")
    outputs = {
        name: StepOutput(name, path.name.rsplit("-", 1)[-1], path, True)
        for name, path in paths.items()
    }
    return RunResult(config, outputs)


def int8_ranker(run: RunResult, mode: str) -> tuple[Path, str]:
    """Return the int8 ONNX file of ``mode`` (``served``: the one the gate chose) and its
    mode's name, from the cached int8 step."""
    from slimrank.pipeline.artifacts import Int8Artifact

    art = Int8Artifact.load(run.path("int8"))
    if mode == "served":
        return art.ranker, f"served ({art.gate['mode']})"
    decision = art.gate["decisions"][mode]
    if not decision.get("model_path"):
        raise SystemExit(f"the int8 step wrote no {mode} ranker")
    return run.path("int8") / decision["model_path"], f"{mode}, not served by this run"


def zscore(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Standardize each row over its real candidates (``mask``); ``-inf`` at pads."""
    s = np.where(mask, scores.astype(np.float64), np.nan)
    mean = np.nanmean(s, axis=1, keepdims=True)
    std = np.nanstd(s, axis=1, keepdims=True)
    return np.where(mask, (s - mean) / np.where(std > 0, std, 1.0), -np.inf)


def candidate_scores(score_fn: ScoreFn, cands: Candidates) -> np.ndarray:
    """Return a peer's ``(U, N)`` scores of each user's candidates (0 at pads)."""
    full = score_fn(cands.user)  # (U, I)
    mask = cands.items >= 0
    return np.where(mask, np.take_along_axis(full, np.maximum(cands.items, 0), axis=1), 0.0)


class View:
    """One view's candidates, truth and z-scored served ranker; blends are scored here."""

    def __init__(self, run: RunResult, part: str, ranker: Path) -> None:
        from slimrank.compression.scorer import onnx_score_fn
        from slimrank.pipeline.artifacts import CandidatesArtifact

        self.part = part
        self.k = run.config.k
        data = DataArtifact.load(run.path("data"))
        self.split = data.split
        self.cands, feats, _ = CandidatesArtifact.load_one(run.path("candidates"), part)
        self.mask = self.cands.items >= 0
        self.truth = data.truth(part)
        served = onnx_score_fn(ranker)(feats)
        self.served_raw = pipeline_per_user(self.cands, served, self.truth, self.k)
        self.served = zscore(served, self.mask)

    def peer_z(self, fit: Callable[..., ScoreFn], params: Mapping[str, Any]) -> np.ndarray:
        """Fit a peer on what this view may read; its z-scores of the candidates."""
        score_fn = fit(observed_interactions(self.split, self.part), params)
        return zscore(candidate_scores(score_fn, self.cands), self.mask)

    def blend(self, terms: list[tuple[float, np.ndarray]]) -> PerUser:
        """Return NDCG@k per user of ``served + sum(w * peer)``."""
        scores = self.served.copy()
        for w, z in terms:
            if w:
                scores = np.where(self.mask, scores + w * z, -np.inf)
        return pipeline_per_user(self.cands, scores, self.truth, self.k)


def ci_text(ci: PairedInterval) -> str:
    return f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"


Setting = tuple[float, float]  # (w ALS, w EASE)


def name_of(setting: Setting) -> str:
    w_als, w_ease = setting
    parts = ["served"]
    if w_als:
        parts.append(f"{w_als:g} x ALS")
    if w_ease:
        parts.append(f"{w_ease:g} x EASE")
    return " + ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument(
        "--ranker",
        default="served",
        choices=("served", "weights", "dynamic"),
        help="which int8 file of the cached int8 step (default: the one the gate served)",
    )
    parser.add_argument("--out", default="peer_blend", help="bench/results/OUT.md")
    args = parser.parse_args()
    started = time.perf_counter()
    run = cached_run(args.config)
    ranker, ranker_name = int8_ranker(run, args.ranker)
    valid, test = View(run, "valid", ranker), View(run, "test", ranker)
    # The ranker as the comparison step scores it: must match the pipeline's figures.
    served_valid = variant_per_user(run, "int8", "valid", ranker=ranker)
    served_test = variant_per_user(run, "int8", "test", ranker=ranker)
    assert np.array_equal(served_valid.values, valid.served_raw.values)
    assert np.array_equal(served_test.values, test.served_raw.values)
    print(
        f"int8 ranker {ranker_name}: valid {served_valid.mean:.4f}, test {served_test.mean:.4f}",
        flush=True,
    )

    # The peers as the comparison chooses them (validation), and their full-ranking test rows.
    ease_peer = next(p for p in PEERS if p.name == "EASE")
    als: PeerResult = evaluate_peer(ALS_SMALL, valid.split)
    ease: PeerResult = evaluate_peer(ease_peer, valid.split)
    for res in (als, ease):
        print(
            f"{res.name} ({format_params(res.params)}): valid {res.valid['ndcg@10']:.4f}, "
            f"test {res.test['ndcg@10']:.4f}, served minus it "
            f"{ci_text(paired_bootstrap(served_test, res.test_per_user, TEST_RESAMPLES))}",
            flush=True,
        )
    als_params = {**als.params, "random_state": 0}
    z_valid = {
        "als": valid.peer_z(ALS_SMALL.fit, als_params),
        "ease": valid.peer_z(ease_peer.fit, ease.params),
    }

    # Validation: every setting, paired against served.
    settings: list[Setting] = [(0.0, 0.0)]
    settings += [(w, 0.0) for w in WEIGHTS if w]
    settings += [(0.0, w) for w in WEIGHTS if w]
    settings += list(itertools.product(ALS_GRID, EASE_GRID))
    rows: dict[Setting, tuple[PerUser, PairedInterval]] = {}
    for setting in settings:
        per = valid.blend([(setting[0], z_valid["als"]), (setting[1], z_valid["ease"])])
        rows[setting] = (per, paired_bootstrap(per, served_valid, VALID_RESAMPLES))
        print(f"valid {name_of(setting)}: {per.mean:.4f} {ci_text(rows[setting][1])}", flush=True)
    assert abs(rows[(0.0, 0.0)][0].mean - served_valid.mean) < 1e-12

    def best(keep: Callable[[Setting], bool]) -> Setting:
        return max((s for s in settings if keep(s)), key=lambda s: rows[s][0].mean)

    chosen = {
        "best of all rows": best(lambda s: True),
        "best ALS-only w": best(lambda s: s[1] == 0.0),
        "best EASE-only w": best(lambda s: s[0] == 0.0),
    }
    print("chosen on validation:", {k: name_of(v) for k, v in chosen.items()}, flush=True)

    # Test, only for the settings validation chose.
    z_test_ease = test.peer_z(ease_peer.fit, ease.params)
    z_test_als = {
        seed: test.peer_z(ALS_SMALL.fit, {**als.params, "random_state": seed}) for seed in SEEDS
    }
    test_rows = []
    for label, setting in chosen.items():
        per = test.blend([(setting[0], z_test_als[0]), (setting[1], z_test_ease)])
        vs = [
            paired_bootstrap(per, other, TEST_RESAMPLES)
            for other in (served_test, als.test_per_user, ease.test_per_user)
        ]
        test_rows.append((label, setting, rows[setting], per.mean, vs))
        print(f"test {label} {name_of(setting)}: {per.mean:.4f}", *map(ci_text, vs), flush=True)

    # ALS seed spread of the chosen blends that read ALS (same w, ALS refitted per seed).
    seed_rows = []
    for setting in dict.fromkeys(s for s in chosen.values() if s[0]):
        for seed in SEEDS:
            params = {**als.params, "random_state": seed}
            z_v = valid.peer_z(ALS_SMALL.fit, params)
            per_v = valid.blend([(setting[0], z_v), (setting[1], z_valid["ease"])])
            per_t = test.blend([(setting[0], z_test_als[seed]), (setting[1], z_test_ease)])
            _, als_alone = score_part(ALS_SMALL.fit, params, test.split, "test")
            vs_served = paired_bootstrap(per_t, served_test, TEST_RESAMPLES)
            vs_als = paired_bootstrap(per_t, als_alone, TEST_RESAMPLES)
            seed_rows.append(
                (setting, seed, per_v.mean, per_t.mean, als_alone.mean, vs_served, vs_als)
            )
            print(
                f"seed {seed} {name_of(setting)}: valid {per_v.mean:.4f} test {per_t.mean:.4f}"
                f" ALS alone {als_alone.mean:.4f} {ci_text(vs_served)} {ci_text(vs_als)}",
                flush=True,
            )
    seconds = time.perf_counter() - started

    n_valid, n_test = len(served_valid.users), len(served_test.users)
    lines = [
        "# Rank-time blend of the served ranker with ALS and EASE (issue 15)",
        "",
        f"`bench/peer_blend.py --config {args.config} --ranker {args.ranker}` on the cached "
        f"`make demo` steps ({seconds:.0f} s). Int8 ranker: {ranker_name}, "
        f"`{ranker.relative_to(run.path('int8'))}` of the int8 step "
        f"(sha256 {sha256_file(ranker)[:8]}...). "
        "Per user, the int8 ranker's scores of its "
        f"{valid.cands.items.shape[1]} candidates and a peer's scores of the same candidates "
        "are z-scored over the user's candidates and summed, `served + w * peer`. Peers read "
        "what the view allows: fitted on train for validation, on train + valid for test, at "
        f"the setting validation chose for them: ALS {format_params(als.params)} "
        f"(random_state 0), EASE {format_params(ease.params)}.",
        "",
        f"Reproduction: int8 ranker valid {served_valid.mean:.4f}, test {served_test.mean:.4f}; "
        f"ALS peer (every item) valid {als.valid['ndcg@10']:.4f}, test "
        f"{als.test['ndcg@10']:.4f}; EASE peer valid {ease.valid['ndcg@10']:.4f}, test "
        f"{ease.test['ndcg@10']:.4f}; served minus ALS on test "
        f"{ci_text(paired_bootstrap(served_test, als.test_per_user, TEST_RESAMPLES))}.",
        "",
        f"## Validation ({n_valid} users; interval: row minus served, paired bootstrap, "
        f"{VALID_RESAMPLES:,} resamples)",
        "",
        "| blend | w ALS | w EASE | valid NDCG@10 | minus served [95% CI] |",
        "|---|---:|---:|---:|---|",
    ]
    for setting in settings:
        per, ci = rows[setting]
        lines.append(
            f"| {name_of(setting)} | {setting[0]:g} | {setting[1]:g} | {per.mean:.4f} | "
            f"{ci_text(ci)} |"
        )
    lines += [
        "",
        f"## Test, for the settings validation chose ({n_test} users; {TEST_RESAMPLES:,} "
        "resamples; the peers rank every item, as in the comparison table)",
        "",
        "| chosen as | blend | valid NDCG@10 | valid minus served | test NDCG@10 "
        "| test minus served | minus ALS peer | minus EASE peer |",
        "|---|---|---:|---|---:|---|---|---|",
    ]
    for label, setting, (v, v_ci), t, vs in test_rows:
        lines.append(
            f"| {label} | {name_of(setting)} | {v.mean:.4f} | {ci_text(v_ci)} | {t:.4f} | "
            + " | ".join(ci_text(ci) for ci in vs)
            + " |"
        )
    lines += [
        "",
        "## ALS seed spread of the chosen blends (same w; ALS refitted with each random_state "
        "for both views; EASE unchanged)",
        "",
        "| blend | ALS seed | valid NDCG@10 | test NDCG@10 | ALS alone, test | "
        "blend minus served, test | blend minus this ALS, test |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for setting, seed, v, t, alone, vs_served, vs_als in seed_rows:
        lines.append(
            f"| {name_of(setting)} | {seed} | {v:.4f} | {t:.4f} | {alone:.4f} | "
            f"{ci_text(vs_served)} | {ci_text(vs_als)} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
