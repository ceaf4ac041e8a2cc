"""MkDocs hook: the docstrings' Sphinx markup, shown as Markdown would not.

The docstrings of ``hdkd`` cross-reference in Sphinx roles (``:func:`hdkd.data.prepare.prepare_dataset```,
``:mod:`~hdkd.training.losses```), which Markdown renders as the role's name beside the code. This hook turns a
role naming a dotted path into an optional cross-reference, which mkdocs-autorefs resolves to the object's
section when the API reference renders it (else: plain code, no warning); a role naming a bare name becomes
plain code. A paragraph ending in reStructuredText's literal-block marker ``::`` keeps one colon.
Registered by ``hooks:`` in mkdocs.yml; ``exclude_docs`` keeps it out of the site.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|exc|obj|const):<code>(~?)([\w.]+)(\(\))?"
                  r"(?:\s+&lt;([\w.]+)&gt;)?</code>")  # :role:`name`, :role:`~a.b.name`, :role:`title <a.b.name>`
LITERAL_MARKER = re.compile(r"(?:<p>::</p>\n?|::(?=</p>))")


def _role(match: re.Match) -> str:
    tilde, name, call, target = match.group(1), match.group(2), match.group(3) or "", match.group(4)
    title = (name.rsplit(".", 1)[-1] if tilde else name) + call
    name = target or name
    if "." not in name:
        return f"<code>{title}</code>"
    return f'<autoref identifier="{name}" optional><code>{title}</code></autoref>'


def _literal(match: re.Match) -> str:
    return "" if match.group(0).startswith("<p>") else ":"


def on_page_content(html: str, **kwargs) -> str:
    return LITERAL_MARKER.sub(_literal, ROLE.sub(_role, html))
