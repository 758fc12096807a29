"""What the bench/*_table.py scripts share: writing their section into RESULTS.md or BENCHMARKS.md."""
import pathlib
import re


def replace_section(path, start, end, lines):
    """Put `lines` (a section that opens with the line `start` and closes with `end`) in place of
    the file's section between those markers, or at its end the first time; the file is
    replaced whole (written beside it, then renamed), so an interrupted run leaves it as it was.
    Returns the section's text."""
    path = pathlib.Path(path)
    section = "\n".join(lines).rstrip("\n") + "\n"
    assert section.startswith(start) and section.rstrip("\n").endswith(end), f"a section runs from {start} to {end}"
    text = path.read_text() if path.exists() else ""
    if start in text:
        pattern = re.escape(start) + r".*?" + re.escape(end) + r"\n?"
        text = re.sub(pattern, lambda _: section, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return section
