"""Build the paper tables and figures from results bundles, without retraining.

    python -m pipeline.report                        # reports/bundle.json + reports/ablations/*.json -> reports/
    python -m pipeline.report --collect-ablations    # MLflow runs -> reports/ablations/ (then `dvc repro report`)
    python -m pipeline.report --rev 1a2b3c4          # a commit's or DVC experiment's report -> runs/1a2b3c4/
    python -m pipeline.report --ablation exp-lambda-1 --ablation runs/b.json   # plus ablation runs
"""

from hdkd.report_command import main

if __name__ == "__main__":
    main()
