"""The READMEs stay true: the Chinese one in step with the English one, both with the code's settings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_strings(path: Path) -> list[str]:
    """The string constants a module's code uses (f-string parts included), docstrings and comments left out:
    a setting named only in prose is not read by anything."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


SOURCES = "\n".join(text for p in sorted((ROOT / "immich_aio").rglob("*.py")) for text in _code_strings(p))
# Named in the READMEs as Immich's own, not ours: the server's URL, the compose tag, and a setting we do not carry over.
IMMICHS = {"IMMICH_MACHINE_LEARNING_URL", "IMMICH_VERSION", "MACHINE_LEARNING_WORKERS"}
SETTING = re.compile(r"\b((?:IMMICH|MACHINE_LEARNING|MT_PHOTOS|HF|MODELSCOPE|INSIGHTFACE)_[A-Z0-9_]+)\b")


def _shell_lines(path: Path) -> set[str]:
    lines: set[str] = set()
    for block in re.findall(r"```sh\n(.*?)```", path.read_text(), flags=re.S):
        lines.update(line.rstrip() for line in block.splitlines() if line.strip())
    return lines


def test_every_command_in_the_chinese_readme_is_the_english_readmes():
    missing = _shell_lines(ROOT / "README.zh-CN.md") - _shell_lines(ROOT / "README.md")
    assert not missing, f"commands in README.zh-CN.md that README.md does not have: {sorted(missing)}"


def test_every_setting_the_readmes_name_is_read_by_the_code():
    for readme in ("README.md", "README.zh-CN.md"):
        named = {m.rstrip("_") for m in SETTING.findall((ROOT / readme).read_text())}
        unknown = {n for n in named - IMMICHS if n not in SOURCES and n.split("__")[0] not in SOURCES}
        assert not unknown, f"{readme} names settings the code never reads: {sorted(unknown)}"


def test_every_setting_the_code_reads_is_in_the_english_readme():
    config = (ROOT / "immich_aio" / "config.py").read_text()
    read = set(re.findall(r'"((?:IMMICH|MACHINE_LEARNING|MT_PHOTOS)_[A-Z0-9_]+)"', config))
    readme = (ROOT / "README.md").read_text()
    assert read, "the pattern no longer finds config.py's settings"
    undocumented = {name for name in read if name not in readme}
    assert not undocumented, f"settings missing from README.md: {sorted(undocumented)}"


def test_the_layout_names_every_module_and_script():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    files = [p.name for p in (ROOT / "immich_aio").glob("*.py") if not p.name.startswith("_")]
    files += [p.name for p in (ROOT / "scripts").iterdir() if p.suffix in {".py", ".sh"}]
    files += [p.name + "/" for p in (ROOT / "immich_aio").iterdir() if (p / "__init__.py").exists()]
    missing = [name for name in files if name not in layout]
    assert not missing, f"README.md's layout does not mention {missing}"
