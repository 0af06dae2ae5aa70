"""Every training or LR range test command in README.md parses and composes exactly as written.

A command is each line of a shell code block, or inline code span, that starts `python -m
distsgd.train`, `distsgd-train` or `torchrun ... -m distsgd.train` (with `\\` continuations joined),
or the same with `distsgd.lr_find` and `distsgd-lr-find`, which compose the same config.
It is split as a shell splits it; what follows the entry point must be Hydra's: -m (a sweep) and
--config-dir, then overrides that Hydra's grammar accepts. "Composes" means that Hydra composes the
config (every swept value in turn) and distsgd.config.to_config validates it; nothing is read, so a
file-path key (data.path, data.root, trainer.resume) may name a file this machine lacks. hydra.*
overrides other than hydra.searchpath configure Hydra itself and are only parsed. A yaml block
whose comment names a file (`# my-configs/experiment/mine.yaml`) is written there first, relative
to the folder the commands run in, so that the README's own examples of user configs are used.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, make_config
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from distsgd.config import to_config

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
ENTRY = re.compile(r"(python -m distsgd\.(train|lr_find)|distsgd-(train|lr-find)"
                   r"|torchrun\s.*?-m distsgd\.(train|lr_find))(\s|$)")
SCRIPTS, MODULES = ("distsgd-train", "distsgd-lr-find"), ("distsgd.train", "distsgd.lr_find")
# Unquoted, the shell expands these (globs, braces); zsh even stops at a glob that matches nothing.
SHELL_PATTERN = set("[]{}*?")


def commands(markdown: str) -> list[str]:
    lines = []
    for language, body in FENCE.findall(markdown):
        if language in ("", "bash", "sh", "shell"):
            lines += body.replace("\\\n", "").splitlines()
    lines += re.findall(r"`([^`\n]+)`", FENCE.sub("", markdown))
    return [line.strip() for line in lines if ENTRY.match(line.strip())]


def user_configs(markdown: str) -> dict[str, str]:
    named = ((re.search(r"^# (\S+\.yaml)$", body, re.M), body)
             for language, body in FENCE.findall(markdown) if language == "yaml")
    return {match[1]: body for match, body in named if match}


def unquoted(command: str) -> str:
    """The characters of a shell command line that no quote or backslash protects, comment cut."""
    kept, quote, escaped = [], None, False
    for i, ch in enumerate(command):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            break
        else:
            kept.append(ch)
    return "".join(kept)


def hydra_arguments(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    if words[0] in SCRIPTS:
        return words[1:]
    return words[next(i for i, word in enumerate(words) if word in MODULES) + 1:]


def compositions(arguments: list[str]) -> list[list[str]]:
    """The override lists that the command composes: one per combination of swept values."""
    overrides, words = [], iter(arguments)
    for word in words:
        if word in ("--config-dir", "-cd"):
            overrides.append(f"hydra.searchpath=[file://{Path(next(words)).resolve()}]")
        elif word not in ("-m", "--multirun"):
            assert not word.startswith("-"), f"{word} is no Hydra flag this test knows"
            overrides.append(word)
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):  # raises on a grammar error
        key = override.get_key_element()
        if key.startswith("hydra.") and key != "hydra.searchpath":
            continue
        if isinstance(override.value(), IntervalSweep):  # what a sampling sweeper draws from: both ends
            choices.append([f"{key}={value}" for value in (override.value().start, override.value().end)])
        elif override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combination) for combination in itertools.product(*choices)]


README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("command", commands(README))
def test_readme_command_parses_and_composes(command, tmp_path, monkeypatch):
    assert not SHELL_PATTERN & set(unquoted(command)), f"the shell would expand part of: {command}; quote it"
    for name, text in user_configs(README).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    for overrides in compositions(hydra_arguments(command)):
        to_config(make_config(*overrides))


def test_the_commands_are_found_as_a_shell_reads_them():
    markdown = "\n".join([
        "Run `python -m distsgd.train -m optim.lr=0.1,1` or `tensorboard --logdir x`.",
        "```bash",
        "torchrun --nnodes=2 --rdzv-id=$JOB -m distsgd.train a=1 \\",
        "    b=2   # comment [x]",
        "distsgd-train 'c=[1,2]'",
        "bash scripts/demo.sh",
        "torchrun --standalone --nproc_per_node=2 -m distsgd.lr_find d=3",
        "distsgd-lr-find",
        "```",
        "```yaml",
        "# @package _global_",
        "# mine/experiment/x.yaml",
        "optim: {lr: 1}",
        "```",
        "```python",
        "python -m distsgd.train not=shell",
        "```",
    ])
    found = commands(markdown)
    assert found == ["torchrun --nnodes=2 --rdzv-id=$JOB -m distsgd.train a=1     b=2   # comment [x]",
                     "distsgd-train 'c=[1,2]'", "torchrun --standalone --nproc_per_node=2 -m distsgd.lr_find d=3",
                     "distsgd-lr-find", "python -m distsgd.train -m optim.lr=0.1,1"]
    assert [hydra_arguments(c) for c in found] == [["a=1", "b=2"], ["c=[1,2]"], ["d=3"], [], ["-m", "optim.lr=0.1,1"]]
    assert [SHELL_PATTERN & set(unquoted(c)) for c in found] == [set()] * 5
    assert SHELL_PATTERN & set(unquoted("distsgd-train c=[1,2] \"d='~/x'\"")) == {"[", "]"}
    assert user_configs(markdown) == {"mine/experiment/x.yaml": "# @package _global_\n# mine/experiment/x.yaml\n"
                                                                 "optim: {lr: 1}\n"}
    assert compositions(["-m", "optim.lr=0.1,1", "model=mlp", "hydra.run.dir=x"]) == [
        ["optim.lr=0.1", "model=mlp"], ["optim.lr=1", "model=mlp"]]
    assert compositions(["-m", "optim.lr=tag(log,interval(0.001,1.0))"]) == [["optim.lr=0.001"], ["optim.lr=1.0"]]
    assert len(commands(README)) >= 15  # the README's own, so that a broken pattern cannot pass them all


def anchor(heading: str) -> str:
    """GitHub's id for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md")))])
def test_every_link_of_a_page_leads_somewhere(page):
    text = (REPO / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (REPO / page).parent / path if path else REPO / page
        assert linked.exists(), f"{page}: {target} names no file"
        if fragment and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
            assert fragment in {anchor(h) for h in headings}, f"{page}: {target} names no heading"
