"""MkDocs hook of the calibrun site (mkdocs.yml `hooks:`; excluded from the pages).

calibrun's docstrings name other objects with Sphinx roles (:func:`scores`,
:class:`TemperatureScaling`); mkdocstrings renders the role's name as text before the code
span. This drops the role and keeps the code span.
"""

import re

_ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|exc|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub("", html)
