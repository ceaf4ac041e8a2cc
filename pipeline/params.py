"""Apply a params overlay: set the values of ``params/paper-*.yaml`` in params.yaml, comments kept.

    python -m pipeline.params --apply params/paper-ham10000.yaml     # then `dvc exp run -n paper-ham10000`
    python -m pipeline.params --apply params/paper-ham10000.yaml --out /tmp/params.yaml

params.yaml is the one source of defaults; an overlay holds only the values that differ, and each of
its keys must exist in params.yaml. The merged params are validated before anything is written.
"""

import argparse
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    import yaml

    from hdkd.config import apply_overlay, parse_params
    from hdkd.infra.io import write_text
    from hdkd.models.baselines import check_baselines

    p = argparse.ArgumentParser(prog="python -m pipeline.params", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--apply", type=Path, required=True, metavar="OVERLAY", help="overlay file (params/paper-*.yaml)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file it overlays")
    p.add_argument("--out", type=Path, help="where to write the merged params (default: --params, in place)")
    args = p.parse_args(argv)
    out = args.out or args.params
    text = apply_overlay(args.params, args.apply)  # validated against the schema, then against timm
    check_baselines(parse_params(yaml.safe_load(text)), f"{args.params} with {args.apply}")
    write_text(out, text)
    print(f"{out}: {args.params} with the values of {args.apply}")


if __name__ == "__main__":
    start()
    main()
