"""The README and docs/ say only what is true of the code: every command's flags are in its script's
--help, every linked file exists, every test named exists."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["download_weights.py", "train.py", "finetune_spam.py", "finetune_instruct.py", "sample.py",
           "explore.py", "bench.py", "tools/bench_data.py", "tools/bench_int8.py", "tools/stress_resume.py",
           "tools/spam_seeds.py", "tools/book_curves.py", "tools/bench_runs.py", "finetune_summarize.py",
           "tools/transformers_sample.py"]
PASSES_TO = {"tools/spam_seeds.py": "finetune_spam.py"}  # a tool that runs a script with the flags after --


def commands(text):
    """(script, its flags) for each `python script.py ...` or `python -m tools.x ...` in text, up to
    the end of the command (a newline, `&&`, `;`, `|`); a command continued with a backslash is one."""
    text = text.replace("\\\n", " ")
    for m in re.finditer(r"python (?:-m (tools)\.(\w+)|([\w/]+\.py))([^\n`|;&]*)", text):
        script = f"tools/{m.group(2)}.py" if m.group(1) else m.group(3)
        own, _, passed = m.group(4).partition(" -- ")  # after --: the flags of the script the tool runs
        yield script, re.findall(r"(?<![\w-])--[a-z][\w-]*", own)
        if script in PASSES_TO:
            yield PASSES_TO[script], re.findall(r"(?<![\w-])--[a-z][\w-]*", passed)


@pytest.fixture(scope="module")
def helps():
    """Each script's --help text, from its parser in this process."""
    import contextlib
    import importlib
    import io
    import sys

    texts = {}
    for script in SCRIPTS:
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        out, argv = io.StringIO(), sys.argv
        sys.argv = [script, "--help"]
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                module.main()
        finally:
            sys.argv = argv
        texts[script] = out.getvalue()
    return texts


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_the_docs_give_a_script_is_in_its_help(doc, helps):
    found = list(commands(doc.read_text(encoding="utf-8")))
    for script, flags in found:
        if script not in helps:
            assert (ROOT / script).is_file() or script.startswith("/"), f"{doc.name}: {script} does not exist"
            continue
        for flag in flags:
            shown_in_help = re.search(rf"(?<![\w-]){flag}(?![\w-])", helps[script])
            assert shown_in_help, f"{doc.name}: {script} has no {flag}"
    if doc.name == "README.md":
        assert {script for script, _ in found} >= set(SCRIPTS[:6])  # each script is shown at work


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_the_docs_link_exists(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) + re.findall(r'<img src="([^"]+)"', text):
        if not re.match(r"https?://", target):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not there"


def test_every_test_the_docs_name_exists():
    names = set()
    for path in [ROOT / "test_gpt2.py", *(ROOT / "tests").glob("test_*.py")]:
        names |= {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    for doc in DOCS:
        named = set(re.findall(r"`(test_\w+)`", doc.read_text(encoding="utf-8")))
        assert named <= names, f"{doc.name} names tests that do not exist: {sorted(named - names)}"
    errors = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    assert len(set(re.findall(r"`(test_\w+)`", errors))) >= 40  # the table of what goes wrong names its tests


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_speak_to_the_user(doc):
    """What the code does and what was measured, not the project's own bookkeeping."""
    said = re.findall(r"\b(borrowed|issues?|this round|rounds? of work|(?:is|are|was|were) (?:not )?met|"
                      r"targets? (?:of|met|reached))\b", doc.read_text(encoding="utf-8"), flags=re.IGNORECASE)
    assert not said, f"{doc.name}: {said}"
