"""README.md's "## Layout" table names every module of the package and every file of the command and config folders
(scripts/, convert/, configs/), each in its folder's row, and nothing that does not exist.

A row's first cell is ``\\`folder/\\`: \\`a.py\\`, \\`b.py\\``` (``dreamomni2_jax/``: the package's top-level modules);
the ``tests/`` row has no module list."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "dreamomni2_jax"
FILE_FOLDERS = ("scripts", "convert", "configs")  # every file, whatever its kind
ROW = re.compile(r"^`(?P<folder>[^`]+/)`(?::\s*(?P<files>.*))?$")


def layout_table(readme: str) -> dict[str, list[str]]:
    """``{folder/: [file, ...]}`` from the first table under "## Layout" (a folder without a list: ``[]``)."""
    section = readme.split("\n## Layout\n", 1)
    assert len(section) == 2, 'README.md has no "## Layout" section'
    section = re.split(r"\n## ", section[1], maxsplit=1)[0]
    rows: dict[str, list[str]] = {}
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    assert len(lines) > 2, 'no table under "## Layout"'
    for line in lines[2:]:  # past the header and the |---| line
        first = line.strip("|").split("|", 1)[0].strip()
        m = ROW.match(first)
        assert m, f"Layout row does not start with `folder/` (optionally `: `a.py`, ...`): {first!r}"
        folder = m["folder"]
        assert folder not in rows, f"Layout table: two rows for {folder}"
        rows[folder] = re.findall(r"`([^`]+)`", m["files"] or "")
    return rows


def files_on_disk() -> set[str]:
    """Repository-relative paths the table must name: the package's modules but ``__init__.py``, and every file
    under the command / config folders (caches and hidden files left out)."""
    def visible(p: Path) -> bool:
        rel = p.relative_to(REPO)
        return p.is_file() and not any(part == "__pycache__" or part.startswith(".") for part in rel.parts)

    found = {p for p in (REPO / PACKAGE).rglob("*.py") if p.name != "__init__.py"}
    for folder in FILE_FOLDERS:
        found |= set((REPO / folder).rglob("*"))
    return {p.relative_to(REPO).as_posix() for p in found if visible(p)}


def test_readme_layout_table_names_every_module_and_nothing_else():
    rows = layout_table((REPO / "README.md").read_text(encoding="utf-8"))
    named = {folder + name for folder, names in rows.items() for name in names}
    on_disk = files_on_disk()

    def row_of(path: str) -> str:
        folder = path.rsplit("/", 1)[0] + "/"
        return f"row `{folder}`" if folder in rows else f"no row for `{folder}`"

    missing = sorted(on_disk - named)
    absent = sorted(p for p in named if not (REPO / p).is_file())
    no_folder = sorted(f for f in rows if not (REPO / f).is_dir())
    problems = ([f"not in the table: {p} ({row_of(p)})" for p in missing]
                + [f"named in the table but no such file: {p}" for p in absent]
                + [f"table row for a folder that does not exist: {f}" for f in no_folder])
    assert not problems, "README.md ## Layout table is out of date:\n  " + "\n  ".join(problems)


def test_layout_table_parser_reads_folders_and_files():
    rows = layout_table("intro\n\n## Layout\n\ntext\n\n| folder: modules | what |\n|---|---|\n"
                        "| `pkg/`: `a.py`, `b.py` | two |\n| `tests/` | no list |\n\n## Next\n| `x/`: `y.py` | z |\n")
    assert rows == {"pkg/": ["a.py", "b.py"], "tests/": []}
