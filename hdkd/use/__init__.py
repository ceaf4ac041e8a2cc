"""Using trained models: the ``hdkd`` command (:mod:`~hdkd.use.cli`), prediction (:mod:`~hdkd.use.predict`,
:mod:`~hdkd.use.inference`), explanations (:mod:`~hdkd.use.explain`) and ONNX export (:mod:`~hdkd.use.export`).

The top wing: may import any other; none imports it.
"""
