"""The compression table: quality, size, sparsity, FLOPs and latency of every ranker variant.

Quality is the pipeline protocol on the test view (retrieve ``n``, rank, top ``k``); latency is
the median time to score ``latency.candidates`` candidates of one test user on one thread,
measured side by side in one process (:func:`~slimrank.compression.latency.interleaved_latency`):
the teacher in torch (its training runtime), the students in onnxruntime (their serving
runtime). Sparsity and FLOPs per candidate cover the Linear (matmul) layers
(:mod:`slimrank.compression.flops`): the teacher's from its torch module, every student's from
the ONNX file that is scored, so the int8 row is measured on the int8 weights themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimrank.compression.cpu import cpu_features, cpu_times, steal_share
from slimrank.compression.latency import interleaved_latency
from slimrank.evaluation.paired import PerUser, paired_bootstrap
from slimrank.pipeline import artifacts
from slimrank.pipeline.artifacts import (
    CandidatesArtifact,
    Int8Artifact,
    PrecisionArtifact,
    SeedsArtifact,
    StudentArtifact,
    TeacherArtifact,
)
from slimrank.pipeline.comparison import (
    Comparison,
    compare,
    comparison_goals,
    comparison_markdown,
    variant_per_user,
)
from slimrank.pipeline.run import RunResult

if TYPE_CHECKING:
    from slimrank.compression.flops import LinearCost

# (key, label, step, directory in the step's output holding metrics.json and the ranker)
VARIANTS = (
    ("retrieval", "retrieval only", "candidates", ""),
    ("teacher", "teacher fp32", "teacher", ""),
    ("student_plain", "student, no KD", "student_plain", ""),
    ("student_distill", "student, KD", "student_distill", ""),
    ("student_pseudo", "student, pseudo-label KD", "student_pseudo", ""),
    ("student_pruned", "pruned, KD", "student_pruned", ""),
    ("pruned_taylor", "pruned Taylor, KD", "pruned_taylor", ""),
    ("pruned_l1", "pruned L1, KD", "pruned_l1", ""),
    ("int8", "pruned int8", "int8", ""),
    ("fp16", "pruned fp16 weights", "precision", artifacts.FP16),
    ("precision", "per-layer precision", "precision", ""),
)
# Variants that share the pruned student's weights (their non-zero parameters are its).
_PRUNED_FORMS = ("int8", "fp16", "precision")
# Variants whose layers may be int8: the row says how many are.
_INT8_FORMS = ("int8", "precision")


@dataclasses.dataclass(frozen=True)
class Row:
    """One variant: test metrics, size and latency (``None`` where it does not apply).

    ``vs_teacher`` is the paired bootstrap 95% interval of its test NDCG@k minus the
    teacher's over the same test users: ``(mean difference, low, high)``.
    """

    key: str
    label: str
    ndcg: float
    recall: float
    valid_ndcg: float
    params: int | None
    sparsity: float | None  # share of zero Linear weights
    flops: int | None  # per candidate, matmuls only, a multiply-add is 2 FLOPs
    bytes: int | None
    p50_seconds: float | None
    speedup: float | None
    vs_teacher: tuple[float, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class SeedSpread:
    """Test NDCG@k of the distilled student trained with each seed (the rest fixed)."""

    test_ndcg: dict[int, float]

    @property
    def spread(self) -> float:
        """Largest minus smallest test NDCG@k over the seeds."""
        values = list(self.test_ndcg.values())
        return max(values) - min(values) if values else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (nan below two seeds)."""
        values = list(self.test_ndcg.values())
        return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_ndcg": {str(k): v for k, v in self.test_ndcg.items()},
            "spread": self.spread,
            "std": self.std,
        }


@dataclasses.dataclass(frozen=True)
class Report:
    """The table's rows, the goals and where each landed."""

    rows: tuple[Row, ...]
    goals: tuple[tuple[str, bool, str], ...]  # (goal, met, what was measured)
    k: int
    candidates: int
    repeats: int
    gate: dict[str, Any]
    comparison: Comparison  # every system under equal information, paired over test users
    seeds: SeedSpread | None = None
    cpu: dict[str, Any] | None = None  # the CPU the latencies were measured on
    precision: dict[str, Any] | None = None  # the per-layer precision search's record

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def to_dict(self) -> dict[str, Any]:
        """Return plain JSON-able values (for bundle manifests and ``report.json``)."""
        return {
            "k": self.k,
            "candidates": self.candidates,
            "repeats": self.repeats,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "goals": [{"goal": g, "met": m, "measured": s} for g, m, s in self.goals],
            "comparison": self.comparison.to_dict(),
            "seeds": self.seeds.to_dict() if self.seeds else None,
            "cpu": self.cpu,
            "precision": self.precision,
        }


def _variant_dir(result: RunResult, key: str) -> Path:
    """Return the directory holding a variant's ``metrics.json``."""
    _, _, step, sub = next(v for v in VARIANTS if v[0] == key)
    return result.path(step) / sub if sub else result.path(step)


def _ranker_paths(result: RunResult) -> dict[str, Path]:
    """Return the ONNX file each student variant is scored (and served) from."""
    precision = PrecisionArtifact.load(result.path("precision"))
    paths = {
        key: StudentArtifact.load(result.path(key)).ranker
        for key in (
            "student_plain",
            "student_distill",
            "student_pseudo",
            "student_pruned",
            "pruned_taylor",
            "pruned_l1",
        )
    }
    paths["int8"] = Int8Artifact.load(result.path("int8")).ranker
    paths["fp16"] = artifacts.ranker_path(precision.fp16)
    paths["precision"] = precision.ranker
    return paths


def per_user_test(result: RunResult, key: str) -> PerUser:
    """Return test NDCG@k per user of one variant (retrieval, teacher, or an ONNX student)."""
    if key in ("retrieval", "teacher"):
        return variant_per_user(result, key)
    return variant_per_user(result, key, ranker=_ranker_paths(result)[key])


def vs_teacher(result: RunResult, resamples: int = 10_000) -> dict[str, tuple[float, ...]]:
    """Return each variant's paired 95% bootstrap interval of test NDCG@k minus the teacher's."""
    teacher = per_user_test(result, "teacher")
    out = {}
    for key, *_ in VARIANTS:
        if key == "teacher":
            continue
        ci = paired_bootstrap(per_user_test(result, key), teacher, resamples)
        out[key] = (ci.diff, ci.low, ci.high)
    return out


def seed_spread(result: RunResult) -> SeedSpread | None:
    """Return the distilled student's test NDCG@k per seed (its own, then ``methods.seeds``)."""
    k = result.config.k
    seeds = SeedsArtifact.load(result.path("student_seeds")).records
    if not seeds:
        return None
    found = {
        result.config.student.seed: float(result.metrics("student_distill")["test"][f"ndcg@{k}"])
    }
    found.update({int(s): float(m["test"][f"ndcg@{k}"]) for s, m in seeds.items()})
    return SeedSpread(found)


def _bench_inputs(result: RunResult, n: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Return ``(features (n, F), user, items (n,))`` of the first test user, tiled to ``n``."""
    cands, feats, _ = CandidatesArtifact.load_one(result.path("candidates"), "test")
    real = feats.mask[0]
    x = feats.values[0][real]
    items = cands.items[0][real]
    reps = int(np.ceil(n / max(len(x), 1)))
    return np.tile(x, (reps, 1))[:n], int(cands.user[0]), np.tile(items, reps)[:n]


def measure_latency(result: RunResult) -> dict[str, dict[str, float]]:
    """Return p50/p90 seconds of each ranker scoring the same candidates on one thread."""
    import torch

    from slimrank.compression.scorer import onnx_score_fn
    from slimrank.ranking.candidates import Candidates
    from slimrank.ranking.features import CandidateFeatures
    from slimrank.ranking.teacher import load_teacher

    cfg = result.config.latency
    x, user, items = _bench_inputs(result, cfg.candidates)
    teacher, _ = load_teacher(TeacherArtifact.model_dir(result.path("teacher")))
    tx = torch.from_numpy(x[None])  # (1, n, F)
    tu = torch.tensor([[user]])  # (1, 1)
    ti = torch.from_numpy(items[None])  # (1, n)
    cands = Candidates(np.array([user]), items[None], np.zeros((1, len(items)), np.float32))
    feats = CandidateFeatures(x[None], (), cands.user, cands.items)
    scorers = {key: onnx_score_fn(path) for key, path in _ranker_paths(result).items()}

    def teacher_fn() -> object:
        with torch.no_grad():
            return teacher(tx, tu, ti)

    fns = {"teacher": teacher_fn}
    fns.update({key: (lambda s=s: s(feats)) for key, s in scorers.items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return interleaved_latency(fns, cfg.repeats, cfg.warmup)
    finally:
        torch.set_num_threads(threads)


def _params(result: RunResult, key: str) -> tuple[int | None, int | None]:
    """Return ``(non-zero parameters, file bytes)`` of a variant."""
    if key == "retrieval":
        return None, None
    if key == "teacher":
        from slimrank.ranking.teacher import WEIGHTS_FILE, count_parameters, load_teacher

        directory = TeacherArtifact.model_dir(result.path("teacher"))
        model, _ = load_teacher(directory)
        return count_parameters(model), (directory / WEIGHTS_FILE).stat().st_size
    step = "student_pruned" if key in _PRUNED_FORMS else key
    info = StudentArtifact.load(result.path(step)).info
    return int(info["nonzero_params"]), _ranker_paths(result)[key].stat().st_size


def _linear_cost(result: RunResult, key: str) -> LinearCost | None:
    """Return the cost of a variant's Linear layers (``None`` for retrieval alone)."""
    from slimrank.compression.flops import linear_cost, onnx_linear_cost

    if key == "retrieval":
        return None
    if key == "teacher":
        from slimrank.ranking.teacher import load_teacher

        model, names = load_teacher(TeacherArtifact.model_dir(result.path("teacher")))
        return linear_cost(model, len(names))
    return onnx_linear_cost(_ranker_paths(result)[key])


def variant_label(label: str, key: str, cost: LinearCost | None, gate: dict[str, Any]) -> str:
    """Return a row's label, saying how many layers of an int8 variant are int8, as read
    from its file: ``"pruned int8 (weights; 3 of 3 layers int8)"``."""
    if key not in _INT8_FORMS or cost is None or not cost.layers:
        return label
    mode = f"{gate['mode']}; " if key == "int8" and gate.get("accepted") else ""
    return f"{label} ({mode}{cost.int8_layers} of {cost.layers} layers int8)"


def report_goals(rows: Sequence[Row], k: int) -> tuple[tuple[str, bool, str], ...]:
    """Return issue 4's compression goals on the test rows: ``(goal, met, measured)`` each.

    The quality goal against the peers is :func:`~slimrank.pipeline.comparison.comparison_goals`.
    """
    by = {r.key: r for r in rows}
    teacher, int8, student = by["teacher"], by["int8"], by["student_distill"]
    ratio = int8.ndcg / teacher.ndcg if teacher.ndcg > 0 else float("nan")
    flops_ok = bool(student.flops and teacher.flops and 10 * student.flops <= teacher.flops)
    return (
        (
            "student <= 1/10 of the teacher's FLOPs per candidate",
            flops_ok,
            f"{student.flops or 0:,} vs {teacher.flops or 0:,}",
        ),
        (
            "pruned int8 student >= 0.99 x teacher test NDCG",
            ratio >= 0.99,
            f"{ratio:.3f} x",
        ),
        (
            "pruned int8 student >= 10x faster than teacher fp32",
            (int8.speedup or 0.0) >= 10.0,
            f"{int8.speedup:.1f}x" if int8.speedup else "n/a",
        ),
        (
            "distillation beats the same student without it (test NDCG)",
            student.ndcg > by["student_plain"].ndcg,
            f"{student.ndcg:.4f} vs {by['student_plain'].ndcg:.4f}",
        ),
    )


def build_report(
    result: RunResult,
    latency: dict[str, dict[str, float]] | None = None,
    comparison: Comparison | None = None,
) -> Report:
    """Return the compression table of ``result`` (measuring latency and the peers unless
    given)."""
    stolen = None
    if latency is None:
        before = cpu_times()
        latency = measure_latency(result)
        stolen = steal_share(before, cpu_times())
    k = result.config.k
    metric, recall = f"ndcg@{k}", f"recall@{k}"
    teacher_p50 = latency["teacher"]["p50"]
    rows = []
    intervals = vs_teacher(result)
    gate = result.gate()
    for key, label, _, _ in VARIANTS:
        m = artifacts.load_metrics(_variant_dir(result, key))
        params, size = _params(result, key)
        cost = _linear_cost(result, key)
        p50 = latency[key]["p50"] if key in latency else None
        rows.append(
            Row(
                key=key,
                label=variant_label(label, key, cost, gate),
                ndcg=float(m["test"][metric]),
                recall=float(m["test"][recall]),
                valid_ndcg=float(m["valid"][metric]),
                params=params,
                sparsity=None if cost is None else cost.sparsity,
                flops=None if cost is None else cost.flops_per_candidate,
                bytes=size,
                p50_seconds=p50,
                speedup=None if p50 is None else teacher_p50 / p50,
                vs_teacher=intervals.get(key),
            )
        )
    if comparison is None:
        comparison = compare(result, {r.key: r.valid_ndcg for r in rows})
    goals = comparison_goals(comparison) + report_goals(rows, k)
    cfg = result.config.latency
    return Report(
        tuple(rows),
        goals,
        k,
        cfg.candidates,
        cfg.repeats,
        gate,
        comparison,
        seed_spread(result),
        {
            **cpu_features(),
            # The share of the machine's CPU time the hypervisor gave other guests while the
            # rankers were timed: a shared VM's slow hour, beside the timings it slowed.
            "steal_pct": None if stolen is None else round(100 * stolen, 1),
        },
        PrecisionArtifact.load(result.path("precision")).summary,
    )


def _fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _fmt_count(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else str(value)


def _fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _fmt_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f} MB" if value >= 1e6 else f"{value / 1e3:.1f} kB"


def _fmt_interval(value: tuple[float, ...] | None) -> str:
    if value is None:
        return "-"
    diff, low, high = value
    return f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]"


def table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    """Return the header and the rows of the table as strings (shared by Markdown and rich)."""
    k = report.k
    header = [
        "variant",
        f"NDCG@{k}",
        f"Recall@{k}",
        "params",
        "sparsity",
        "FLOPs",
        "bytes",
        "p50 µs",
        "speedup",
        "vs teacher [95% CI]",
    ]
    rows = []
    for r in report.rows:
        rows.append(
            [
                r.label,
                f"{r.ndcg:.4f}",
                f"{r.recall:.4f}",
                _fmt_int(r.params),
                _fmt_share(r.sparsity),
                _fmt_count(r.flops),
                _fmt_bytes(r.bytes),
                "-" if r.p50_seconds is None else f"{r.p50_seconds * 1e6:,.0f}",
                "-" if r.speedup is None else f"{r.speedup:.1f}x",
                _fmt_interval(r.vs_teacher),
            ]
        )
    return header, rows


def table_caption(report: Report) -> str:
    """Return what the table's columns mean (under the Markdown table and the printed one)."""
    return (
        f"Test view: retrieve, rank, top {report.k}. params: non-zero parameters (the "
        "teacher's include its id embeddings, when it has them). sparsity: share of zero "
        "weights in the Linear layers, pruning masks folded (int8: of the stored int8 "
        "weights). FLOPs: to score one candidate, 2 per multiply-add of the Linear layers "
        "(matmuls only: no biases, activations or elementwise products; dense, so pruned "
        "zeros count; int8 stores the same matmuls' weights in 8 bits; k = 1e3, M = 1e6). p50: "
        f"median of {report.repeats} interleaved calls scoring {report.candidates} candidates "
        "on one thread; teacher in torch, students in onnxruntime; speedup over the teacher's "
        "p50. vs teacher: test NDCG minus the teacher's, mean over the same test users, with a "
        "paired bootstrap 95% interval (users resampled 10,000 times)."
    )


def _seed_line(report: Report) -> str:
    seeds = report.seeds
    if seeds is None:
        return "Seed spread: not measured (methods.seeds is empty)."
    each = ", ".join(f"seed {s}: {v:.4f}" for s, v in seeds.test_ndcg.items())
    return (
        f"Seed spread of the distilled student (test NDCG@{report.k}; everything before the "
        f"student fixed): {each}; range {seeds.spread:.4f}, std {seeds.std:.4f}. A row's "
        "difference smaller than this spread is within what a student seed changes."
    )


def _cpu_line(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return "Measured on: CPU not recorded."
    vnni = {True: "with VNNI", False: "without VNNI", None: "VNNI unknown"}[cpu.get("vnni")]
    flags = ", ".join(cpu.get("flags") or []) or "none found"
    name = cpu.get("model") or "unknown CPU"
    steal = cpu.get("steal_pct")
    stolen = "" if steal is None else f" Hypervisor steal while the rankers were timed: {steal}%."
    return f"Measured on: {name} ({cpu.get('cpus')} CPUs, {vnni}; {flags}).{stolen}"


def _gate_line(gate: dict[str, Any], k: int) -> str:
    """Return one line on the int8 gate's checks and outcome."""
    first = next(iter(gate.get("decisions", {}).values()), {})
    bar = first.get("min_same_top_k")
    checks = f"validation NDCG vs teacher, min ratio {gate['min_ratio']}"
    if bar:
        checks += f"; same top-{k} set as fp32 for >= {bar:.0%} of validation users"
    if not gate["accepted"]:
        return f"Gate ({checks}): FAILED"
    chosen = gate["decisions"][gate["mode"]]
    line = f"Gate ({checks}): passed with int8 mode {gate['mode']}"
    if chosen.get("same_top_k") is not None:
        line += f" (same top-{k}: {chosen['same_top_k']:.1%}"
        fp32 = chosen.get("excluded_nodes") or []
        line += f"; fp32 layers: {', '.join(fp32)})" if fp32 else ")"
    if gate.get("choice"):
        line += f". Served mode: {gate['choice']}"
    return line


def _precision_line(search: dict[str, Any] | None) -> str:
    """Return one line on the per-layer precision search: plans, passes, the one kept."""
    if not search:
        return ""
    results = search["results"]
    passed = sum(r["passed"] for r in results)
    line = f"Per-layer precision search: {len(results)} plans, {passed} passed the gate"
    if search["chosen"] is None:
        return line + "; none kept (the row is the fp32 pruned student)."
    plan = results[search["chosen"]]["plan"]
    layers = ", ".join(f"{n} {p}" for n, p in plan.items())
    return line + f"; the fastest that passed: {layers}."


def render_markdown(report: Report, command: str = "") -> str:
    """Return the table, the gate and the goals as Markdown."""
    header, rows = table_cells(report)
    lines = ["# Compression report", ""]
    if command:
        lines += [f"Reproduce: `{command}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    gate = report.gate
    lines += [
        "",
        table_caption(report),
        "",
        _seed_line(report),
        "",
        _cpu_line(report.cpu),
        "",
        _gate_line(gate, report.k),
        "",
        _precision_line(report.precision),
        "",
        "## Quality under equal information",
        "",
        *comparison_markdown(report.comparison),
        "",
        "## Goals",
        "",
    ]
    lines += [f"- [{'x' if met else ' '}] {goal}: {seen}" for goal, met, seen in report.goals]
    return "\n".join(lines) + "\n"


def quality_latency_figure(report: Report) -> Any:
    """Return the matplotlib figure of test NDCG against p50 latency (log scale).

    Labels never overlap, however close the points: each ranker has its own marker and
    colour, named in a legend beside the axes, and no text is drawn inside the axes (rankers
    of one size sit within a few µs of each other, where annotations collided). The x axis
    has plain-number ticks at 1-2-5 steps only, without the log axis's crowded minor labels;
    horizontal lines mark the retrieval-only quality and the strongest peer.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(10, 5))
    markers = "osD^vP*Xhp<>"
    timed = [r for r in report.rows if r.p50_seconds is not None]
    for i, r in enumerate(timed):
        x = r.p50_seconds * 1e6  # type: ignore[operator]
        ax.scatter(
            x, r.ndcg, s=70, marker=markers[i % len(markers)], alpha=0.8, label=r.label, zorder=3
        )
    for r in report.rows:
        if r.p50_seconds is None:
            ax.axhline(r.ndcg, color="grey", linestyle="--", linewidth=1, label=f"{r.label}")
    best = report.comparison.row(report.comparison.strongest_peer)
    ax.axhline(
        best.test_ndcg,
        color="tab:red",
        linestyle=":",
        linewidth=1,
        label=f"{best.name} (strongest peer, equal information)",
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"p50 latency to score {report.candidates} candidates, 1 thread (µs)")
    ax.set_ylabel(f"test NDCG@{report.k}")
    ax.set_title("Quality against latency")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_report(report: Report, path: str | Path) -> Path:
    """Write :func:`quality_latency_figure` as a PNG to ``path``; return it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = quality_latency_figure(report)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
