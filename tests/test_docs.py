"""The docs run: every code block of README.md and docs/*.md is executed (tests/docs_runner.py says how)."""

import ast
import re

import pytest

import docs_runner
from docs_runner import DOCS, GUIDE, NOT_RUN, ROOT, DocError, DocRun, flag_reference, guide_flags_section


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_example_runs(doc, tiny_teacher, corpus_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = DocRun(tmp_path, tiny_teacher, corpus_file).run_file(doc)
    # Every command either ran (exit 0) or is one NOT_RUN names, with its reason.
    assert all(status == "ran" or status in NOT_RUN.values() for _, status in log), log


def test_the_readme_keeps_the_ci_test_command():
    command = 'pip install -e ".[test]" && pytest -q'
    assert command in (ROOT / "README.md").read_text() and command in (ROOT / ".ci" / "run").read_text()


def test_the_guide_flag_reference_is_generated_from_the_parser():
    assert guide_flags_section(GUIDE.read_text()) == flag_reference(), (
        "docs/GUIDE.md's flag reference is stale: run `python tests/docs_runner.py --write-flags`")


def test_every_distill_flag_is_in_the_guide():
    from hybridopt.cli import build_parser

    distill = build_parser()._subparsers._group_actions[0].choices["distill"]
    flags = {s for a in distill._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    guide = GUIDE.read_text()
    assert flags and not [f for f in sorted(flags) if not re.search(rf"{re.escape(f)}\b", guide)]


def test_every_flag_the_docs_mention_exists():
    """A flag renamed in the code must not live on in prose (commands are checked by running them)."""
    from hybridopt.cli import build_parser

    parser = build_parser()
    known = {s for p in parser._subparsers._group_actions[0].choices.values() for a in p._actions
             for s in a.option_strings}
    for script in (ROOT / "benchmarks").glob("*.py"):
        known |= set(re.findall(r"add_argument\(\s*\"(--\w+)\"", script.read_text()))
    known |= {"--version", "--index-url", "--no-deps", "--durations", "--write-flags"}  # hybridopt, pip, pytest, this runner
    from torch.distributed.run import get_args_parser  # torchrun's own flags (GUIDE, "Scaling out")

    known |= {s for a in get_args_parser()._actions for s in a.option_strings}
    for doc in DOCS:
        mentioned = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", doc.read_text()))
        assert not mentioned - known, f"{doc.name} mentions unknown flags {sorted(mentioned - known)}"


def test_the_runner_fails_on_a_broken_example(tmp_path, monkeypatch, tiny_teacher, corpus_file):
    monkeypatch.chdir(tmp_path)
    broken = {
        "bad.md": "```bash\nhybridopt distill --no_such_flag\n```\n",
        "unknown.md": "```bash\nmake everything\n```\n",
        "unlabelled.md": "```\nhybridopt distill\n```\n",
        "python.md": "```python\nfrom hybridopt import NoSuchThing\n```\n",
        "placeholder.md": "```bash\nhybridopt inspect hybridopt-runs/distill-<timestamp>\n```\n",
    }
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DocError, match=name):
            DocRun(tmp_path, tiny_teacher, corpus_file).run_file(tmp_path / name)


def test_commands_split_like_a_shell():
    block = docs_runner.Block(ROOT / "x.md", 1, "bash", 'rm -rf ~/.cache/hybridopt && time hybridopt distill \\\n'
                              '  --epochs 20   # a comment\nhybridopt generate --prompt "The with statement"\n')
    assert docs_runner.commands(block) == [["rm", "-rf", "~/.cache/hybridopt"], ["time", "hybridopt", "distill", "--epochs", "20"],
                                           ["hybridopt", "generate", "--prompt", "The with statement"]]


def _message_pieces() -> list[str]:
    """The literal text of every string in the package, f-strings cut at their fields."""
    pieces = []
    for path in (ROOT / "src" / "hybridopt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                pieces += [v.value for v in node.values if isinstance(v, ast.Constant)]
    return pieces


def test_the_troubleshooting_messages_are_the_codes():
    """Each message the GUIDE's troubleshooting table quotes is still what the code says."""
    text = GUIDE.read_text()
    rows = [r for r in text[text.index("## Troubleshooting"):].splitlines() if r.startswith("| `")]
    code = _message_pieces()
    checked = 0
    for row in rows:
        for quoted in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            quoted = re.sub(r"^(warning: |--[\w/]+: )", "", quoted)  # added by Reporter.warn and errors.for_flag
            for piece in re.split(r"<[^>]+>|\b[A-Z]\b", quoted):  # <value> and single capitals are values
                piece = piece.strip(" ,;:'/")
                if len(piece) >= 6:
                    assert any(piece in c for c in code), f"GUIDE troubleshooting quotes {piece!r}, not in src/"
                    checked += 1
    assert checked > 30


def test_the_guide_layout_names_every_module():
    guide = GUIDE.read_text()
    layout = guide[guide.index("### Layout"):]
    package = ROOT / "src" / "hybridopt"
    modules = [p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert modules and not [m for m in modules if not re.search(rf"(?m)^\s+{re.escape(m)}\s", layout)]
