"""The docs site's API reference covers the whole library: every module of hdkd/ has its ``::: hdkd.<module>``
block in docs/reference/ (a new module without one would be missing from the site without any warning)."""

from __future__ import annotations

import re

from tests.helpers import ROOT


def test_every_module_of_the_library_is_in_the_api_reference():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "hdkd").rglob("*.py")}
    documented = {m for page in (ROOT / "docs" / "reference").glob("*.md")
                  for m in re.findall(r"^::: (hdkd[\w.]*)\s*$", page.read_text(), re.M)}
    assert not sorted(modules - documented), f"add to docs/reference/: {sorted(modules - documented)}"
    assert not sorted(documented - modules), f"no such module: {sorted(documented - modules)}"
