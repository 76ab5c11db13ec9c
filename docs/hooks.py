"""mkdocs hooks: the rules page's catalog table, generated from the installed library; the
docstrings' Sphinx roles and ``::`` literal markers, shown as plain code in the API reference."""

from __future__ import annotations

import re

# :func:`~neuralign.ops.num_samples` renders as ":func:<code>~neuralign.ops.num_samples</code>"
_ROLE = re.compile(r":(?:func|class|meth|data|mod|attr|exc):<code>~?([^<]*)</code>")


def _catalog_table() -> str:
    from neuralign.rules import catalog

    rows = ["| rule | kind | terms | switches | rate | what it does | source |", "|---|---|---|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    for info in catalog():
        r = info.rule
        terms = ", ".join(f"{k} {v:g}" for k, v in r.terms.items()) or "–"
        switches = []
        if r.noise is not None:
            switches.append(f"mirror noise {r.noise.dist} σ={r.noise.std:g}")
        if r.kp:
            switches.append("W's task gradient")
        learned = r.kind == "learned"
        rows.append(f"| `{info.name}` | {r.kind} | {terms} | {', '.join(switches) or '–'} | "
                    f"{r.rate:g} | {cell(info.description)} | {cell(info.source)} |" if learned else
                    f"| `{info.name}` | {r.kind} | – | – | – | {cell(info.description)} | {cell(info.source)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- catalog -->" in markdown:
        markdown = markdown.replace("<!-- catalog -->", _catalog_table())
    return markdown


def on_page_content(html: str, page, config, files) -> str:
    if not page.file.src_uri.startswith("api/"):
        return html
    def code(m: re.Match) -> str:
        name = m.group(1)
        return f"<code>{name.rsplit('.', 1)[-1] if '~' in m.group(0) else name}</code>"

    return _ROLE.sub(code, html).replace("::</p>", ":</p>")
