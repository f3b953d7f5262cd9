"""Tables as Markdown and HTML (rows of strings, header first): the compress, explain and report stages' writers."""
import html


def markdown_table(table):
    """Rows of strings, header first, as a Markdown table."""
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def html_table(table):
    """Rows of strings, header first, as an HTML table (cells escaped)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
