"""The report wing: paper tables and figures built from results bundles alone.

- :mod:`hdkd.report.build`: a report (tables, figures, model card, README) from a bundle, all of it or none;
- :mod:`hdkd.report.tables`, :mod:`hdkd.report.figures`, :mod:`hdkd.report.readme`: its parts;
- :mod:`hdkd.report.diagnostics`: how the models trained (loss terms, gradients, class shares per epoch);
- :mod:`hdkd.report.model_card`: the HDKD student's model card;
- :mod:`hdkd.report.ablations`: the ablation definitions, their DVC queue and their collection from MLflow;
- :mod:`hdkd.report.revisions`: the bundle of a git commit or DVC experiment;
- :mod:`hdkd.report.check`: fresh reports against committed ones;
- :mod:`hdkd.report.stage`: the report stage and the report's commands as plain functions
  (``pipeline/report.py``, ``pipeline/revision_report.py``, ``pipeline/ablations.py``);
- :mod:`hdkd.report.study`: the study, in a git worktree (``pipeline/study.py``).

May import: :mod:`hdkd.evidence`, :mod:`hdkd.infra` and the top-level modules; never torch (``.importlinter``).
"""
