"""The report wing: paper tables and figures built from results bundles alone (no torch).

- :mod:`hdkd.report.build`: tables, figures and the ``reports/`` index from bundles;
- :mod:`hdkd.report.ablations`: the ablation definitions, their DVC queue and their collection from MLflow;
- :mod:`hdkd.report.revisions`: the bundle of a git commit or DVC experiment (``--rev``);
- :mod:`hdkd.report.check`: fresh reports against committed ones, within tolerance;
- :mod:`hdkd.report.stage`: the report stage as plain functions (command line: ``pipeline/report.py``).
"""
