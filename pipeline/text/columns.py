"""Which column is the text and which the label, and whether a first row is a header, judged by content."""
import re
import sys

from pipeline.core.errors import PipelineError

# A column name: starts with a letter or "_", then at most 40 word characters, spaces, dots or dashes,
# in at most four words. Prose and numbers ("1", "0.5") are not names.
NAME_RE = re.compile(r"[A-Za-z_][\w .-]{0,40}")


def _is_name(field):
    return bool(NAME_RE.fullmatch(field)) and len(field.split()) <= 4


def _label_like(values):
    """Few distinct values, some repeated: what a label column holds (ids and texts are all different)."""
    distinct = len(set(values))
    return distinct < len(values) and distinct <= max(20, len(values) // 20)


def _distinct_chars(values):
    """Characters in a column's distinct values: most for the text column. Mean length alone can
    pick a label column ("positive" is longer than "awful"); labels repeat, texts mostly do not."""
    return sum(map(len, set(values)))


def looks_like_header(first, rest):
    """Whether a first row that names no configured column is a header anyway, judged by content."""
    # Rule: every field of the row looks like a column name (_is_name, all different), and the rows
    # below contradict its being an example:
    #  - where some column is label-like (_label_like below the first row), the first row's value
    #    occurs in none of them: a real example's label recurs among the other examples, a column
    #    name does not ("sentiment" never appears among pos/neg);
    #  - where no column is label-like (e.g. one text column), its value in the text column (the most
    #    distinct characters) is under a quarter of that column's median length, with 5+ rows below.
    # Anything less certain, and files of under 3 rows, read as data: GLUE's headerless text<TAB>label
    # and label-first World<TAB>news text keep their first example ("World" recurs; "1" is no name).
    rest = [[f.strip() for f in fields] for _, fields in rest if len(fields) == len(first)]
    if len(rest) < 2 or len(set(first)) < len(first) or not all(map(_is_name, first)):
        return False
    columns = list(zip(*rest))
    labels = [j for j, col in enumerate(columns) if _label_like(col)]
    if labels:
        return all(first[j] not in columns[j] for j in labels)
    text_j = max(range(len(columns)), key=lambda j: _distinct_chars(columns[j]))
    median = sorted(map(len, columns[text_j]))[len(rest) // 2]
    return len(rest) >= 5 and 4 * len(first[text_j]) <= median


def choose_columns(name, line, names, columns, data_cfg, require_labels, header):
    """(text index, label index or None): the configured names (or "text"/"label") when the header has
    them, else by content; prints to stderr what it chose by content among 2+ columns."""
    text_names, label_names = (data_cfg.text_column, "text"), (data_cfg.label_column, "label")
    named = lambda wanted: next((names.index(c) for c in wanted if header and c in names), None)  # noqa: E731
    text_i, label_i = named(text_names), named(label_names)
    guessed = text_i is None
    if text_i is None:
        others = [j for j in range(len(names)) if j != label_i]
        if not others:
            raise PipelineError(f"{name}:{line}: missing text column {either(data_cfg.text_column, 'text')}; "
                                f"columns: {', '.join(names)}")
        text_i = max(others, key=lambda j: (_distinct_chars(columns[j]), -j))  # ties: the leftmost
    if label_i is None:  # fewest distinct values among label-like columns
        others = [j for j in range(len(names)) if j != text_i]
        candidates = [j for j in others if _label_like(columns[j])]
        if not header and len(others) == 1:
            candidates = others  # headerless text,label (or label,text): the other column, as GLUE writes it
        label_i = min(candidates, key=lambda j: (len(set(columns[j])), j)) if candidates else None
        guessed = guessed or label_i is not None
    if label_i is None and require_labels:
        if not header and len(names) == 1:
            raise PipelineError(f"{name}:{line}: one column and no header, so no labels; expected "
                                f"text{'<TAB>' if name.lower().endswith('.tsv') else ','}label")
        raise PipelineError(f"{name}:{line}: missing label column {either(data_cfg.label_column, 'label')}, and no "
                            f"other column has few, repeated values as labels do; columns: {', '.join(names)}")
    if guessed and len(names) > 1:
        label = f"label column '{names[label_i]}'" if label_i is not None else "no label column"
        if header:
            how = "set data.text_column/data.label_column to override"
        else:
            how = (f"no header; add one naming the '{data_cfg.text_column}' and '{data_cfg.label_column}' "
                   "columns to override")
        print(f"reading {name}: text column '{names[text_i]}', {label} (chosen by content; {how})", file=sys.stderr)
    return text_i, label_i


def either(column, fallback):
    """'column' (or 'fallback'), naming the fallback only when it differs."""
    return f"'{column}'" + (f" (or '{fallback}')" if column != fallback else "")
