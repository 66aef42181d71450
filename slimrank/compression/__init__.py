"""Distillation, pruning, int8 quantization and the accuracy gate.

It imports nothing from :mod:`slimrank.pipeline` (a test reads the imports): the pipeline's
steps and engines call into it. Students train in one loop, :func:`~slimrank.compression.fit.
train_epoch`, which :func:`~slimrank.compression.fit.train_student` and
:func:`~slimrank.compression.fit.fit_epochs` (the epoch chosen on validation; the local and Ray
engines both run it) share.

The pieces, in the order a ``compress`` job chains them (each returns a new object)::

    data = pad_lists(features_per_user, teacher_scores_per_user, labels_per_user)  # lists
    student = train_student(MLPRanker(MLPConfig(F)), data, DistillConfig(), TrainConfig()).model
    pruner = MagnitudePruner(PruningSchedule(final_sparsity=0.5, end_step=..., frequency=...))
    sparse = train_student(student, data, DistillConfig(), TrainConfig(), pruner).model  # pruning
    small = train_student(prune_units(student, 0.5), data, ...).model  # structured + fine-tune
    check count_cost(small, F).flops_per_candidate <= 0.1 * count_cost(teacher, F)...  # flops
    onnx_path = export_onnx(fold_standardization(small, mean, std), dir / "fp32.onnx", F)
    decision = gate_int8(onnx_path, dir, metric=ndcg_at_10_of, teacher_metric=teacher_ndcg,
                         calibration=sample_candidates,
                         lists=ReferenceLists(valid_features, valid_mask))  # quantize + gate
    Scorer(decision.model_path, decision.sha256).score(candidates)  # serving
"""
