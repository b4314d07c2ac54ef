"""Every `dist-tempnet` command the documents show is one the CLI accepts, with a config that validates.

Each fenced bash block of README.md and k8s/README.md is read; every `dist-tempnet ...` command in
it (also behind `launch/submit.sh ... --`) is parsed by the real argument parser, and for `train`,
`plan` and `sweep` its config file plus dotted overrides are loaded and validated as `train` would
before any worker starts. A renamed flag, a config key that no longer exists or a value out of range
in the documentation fails here. The commands of the README's CLI section that need no Ray, no
data of the user's and no network are then run for real, in a temporary folder.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dist_tempnet.commands.cli import build_parser, main
from dist_tempnet.driver.submit import check_entrypoint

REPO = Path(__file__).resolve().parent.parent
DOCS = (REPO / "README.md", REPO / "k8s" / "README.md")
FENCE = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def fenced_commands(markdown: str) -> list[str]:
    """The shell commands of the bash fences, continuation lines joined, comments dropped."""
    commands = []
    for block in FENCE.findall(markdown):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quoted argument that goes on over the next lines
                continue
            pending = ""
            if words:
                commands.append(shlex.join(words))
        assert not pending, f"unbalanced quotes in a fenced block: {pending!r}"
    return commands


def dist_tempnet_commands(commands: list[str]) -> list[str]:
    """The `dist-tempnet ...` part of each command that runs one (directly or through submit.sh)."""
    found = []
    for command in commands:
        words = shlex.split(command)
        if words and words[0] == "dist-tempnet":
            found.append(command)
        elif words and words[0].endswith("submit.sh") and "--" in words:
            found.append(shlex.join(words[words.index("--") + 1 :]))
    return found


def documented() -> list[tuple[str, str]]:
    return [
        (doc.relative_to(REPO).as_posix(), command)
        for doc in DOCS
        for command in dist_tempnet_commands(fenced_commands(doc.read_text()))
    ]


def test_the_documents_show_the_commands_this_test_checks():
    verbs = {shlex.split(command)[1] for _, command in documented()}
    # If a section is rewritten so that its commands are no longer in bash fences, say so here.
    expected = {"train", "make-shards", "index-shards", "eval", "export", "generate", "compare"}
    expected |= {"sweep", "plan"}
    assert expected <= verbs


@pytest.mark.parametrize("doc,command", documented(), ids=lambda x: x if len(x) < 60 else x[:57] + "...")
def test_documented_command_parses_and_its_config_validates(doc, command):
    """check_entrypoint raises (ValueError for the parser, ConfigError for the config) on any error."""
    check_entrypoint(command, build_parser(), resolve_config=lambda path: REPO / path)


def test_the_check_catches_a_wrong_flag_and_a_wrong_key():
    wrong = "```bash\ndist-tempnet train --confg configs/clip_tiny.yaml\n"
    wrong += "dist-tempnet train train.stepz=5\n```\n"
    commands = dist_tempnet_commands(fenced_commands(wrong))
    with pytest.raises(ValueError, match="--confg"):
        check_entrypoint(commands[0], build_parser(), resolve_config=lambda path: REPO / path)
    with pytest.raises(Exception, match="stepz"):
        check_entrypoint(commands[1], build_parser(), resolve_config=lambda path: REPO / path)


# README commands that are complete as written (no Ray, no user data, no hub) and that no other test
# runs exactly as shown; the other commands' behaviour is covered by the tests of each command.
RUN_AS_WRITTEN = ("dist-tempnet plan --config configs/clip_vitb32_cc12m.yaml --gpus 8 --gpu-mem 80",)


@pytest.mark.parametrize("command", RUN_AS_WRITTEN)
def test_self_contained_readme_commands_run_as_written(command, tmp_path, monkeypatch):
    assert command in [c for _, c in documented()], f"the README no longer shows {command!r}"
    # Relative paths as in the README: run from a folder that has the repository's configs.
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(command)[1:]) == 0
