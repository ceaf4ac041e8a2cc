"""DVC stage `export`: the teacher, student and HDKD networks -> exports/<name>/model.onnx, checked and
timed -> reports/export.json.

ONNX Runtime must match PyTorch on every test image (max |Δ probability| <= 1e-4, same top-1) or the
stage fails; CPU latency of both runtimes at evaluate.latency_batch_sizes (see hdkd.use.export).
"""

from pipeline import _models, start


def main(argv: list[str] | None = None) -> dict:
    from hdkd.use.export import export_stage

    args, params = _models.parse("pipeline.export", __doc__, "reports/export.json", argv,
                                 exports=("exports", "<dir>/<model>/model.onnx"))
    return export_stage(params, args.data, args.models, args.exports, args.out)


if __name__ == "__main__":
    start()
    main()
