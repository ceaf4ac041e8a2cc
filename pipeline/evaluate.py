"""DVC stage `evaluate`: teacher, student and HDKD on the held-out test split, once -> reports/.

Metrics (with bootstrap CIs), efficiency (params, MACs, latency), the results bundle and DVC
plots data. Options: `python -m pipeline.evaluate --help`.
"""

from hdkd.evaluate import main

if __name__ == "__main__":
    main()
