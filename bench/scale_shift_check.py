"""Does the served int8 ranker lose NDCG on the test view because its features come from
other item-item tables than the ones it trained on? Scores the 1M run's test candidates with
the test view's own tables (as served) and with the history fold's (as the rankers trained
on before ``candidates.fold_items = "all"``; the run at e479dd6 trained on them).

    nice -n 19 .venv/bin/python bench/scale_shift_check.py \
        bench/.cache/scale/cache-1000000u-1000000i-20-oe9c68b9b
"""

import glob
import json
import sys
import time
from pathlib import Path

from slimrank.compression.scorer import onnx_score_fn
from slimrank.evaluation.metrics import ranking_metrics
from slimrank.pipeline.artifacts import CandidatesArtifact, DataArtifact, EmbeddingsArtifact
from slimrank.pipeline.config import CandidateConfig
from slimrank.ranking.features import build_feature_tables, candidate_features
from slimrank.ranking.pipeline_eval import rank_candidates

cache = Path(sys.argv[1])
one = lambda step: Path(glob.glob(str(cache / f"{step}-*"))[0])  # noqa: E731
config = CandidateConfig.from_dict(
    json.loads((one("candidates") / "step.json").read_text())["config"]["candidates"]
)
data = DataArtifact.load(one("data"))
emb = EmbeddingsArtifact.load(one("embeddings"))
cands, saved, _ = CandidatesArtifact.load_one(one("candidates"), "test")
score = onnx_score_fn(one("int8") / "ranker.int8.onnx")
truth = data.truth("test")[cands.user]
sides = (data.user_features, data.item_features, config.features)
start = time.process_time()
fold = build_feature_tables(
    emb.history[0], emb.user["fold0"], emb.item, *sides, time=data.seen_times("valid")
)
test_on_fold = build_feature_tables(
    data.seen("test"),
    emb.user["test"],
    emb.item,
    *sides,
    time=data.seen_times("test"),
    item_item=fold,
)
out = {"cpu_s": None}
for name, feats in (
    ("own tables (served)", saved),
    ("fold tables", candidate_features(test_on_fold, cands)),
):
    top = rank_candidates(cands.items, score(feats), 10)
    out[name] = round(ranking_metrics(top, truth, (10,))["ndcg@10"], 4)
out["cpu_s"] = round(time.process_time() - start, 1)
print(json.dumps(out))
