"""Shell completion for hivectl: `hivectl completion bash|zsh|fish`.

The scripts are small templates; the commands and their options are read
from hivectl's own argparse parser, so they cannot drift from it. Node names
(drain, undrain) and job ids (cancel) come from `hivectl completion --words
nodes|jobs`, which asks the daemon (the one `--connect` names on the command
line being completed, else the local one) and prints nothing where none
answers within a second.
"""

from __future__ import annotations

import argparse

# Which words complete a command's positional argument.
WORDS = {"drain": "nodes", "undrain": "nodes", "cancel": "jobs"}
FILES = ("keygen",)  # commands whose argument is a path
GLOBAL_VALUES = ("--connect", "--key-file")  # options of hivectl itself that take a value

_BASH = r"""# hivectl completion for bash: source <(hivectl completion bash)
_hivectl() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local i command="" connect=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            --connect|--key-file) connect+=("${COMP_WORDS[i]}" "${COMP_WORDS[i+1]}"); ((i++)) ;;
            -*) ;;
            *) [[ -z "$command" ]] && command="${COMP_WORDS[i]}" ;;
        esac
    done
    case "$prev" in
        --connect|--user) return ;;
        --key-file|--config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    local words=""
    case "$command" in
        "") words="@COMMANDS@ @GLOBAL@" ;;
@CASES@
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F _hivectl hivectl
"""

_ZSH_HEAD = """# hivectl completion for zsh: source <(hivectl completion zsh), after compinit
autoload -U +X bashcompinit && bashcompinit
"""

_FISH_HEAD = """# hivectl completion for fish: hivectl completion fish | source
complete -c hivectl -f
"""


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell` ("bash", "zsh" or "fish")."""
    commands = _commands(parser)
    if shell == "fish":
        return _fish(parser, commands)
    bash = _bash(parser, commands)
    return _ZSH_HEAD + bash if shell == "zsh" else bash


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> list[str]:
    return [o for a in p._actions for o in a.option_strings if o.startswith("--")]


def _choices(p: argparse.ArgumentParser) -> list[str]:
    """A positional argument's fixed choices (completion's shells)."""
    return [str(c) for a in p._actions if not a.option_strings and a.choices for c in a.choices]


def _bash(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser]) -> str:
    cases = []
    for name, p in commands.items():
        words = " ".join(_options(p) + _choices(p))
        if name in WORDS:
            words += f' $(hivectl "${{connect[@]}}" completion --words {WORDS[name]} 2>/dev/null)'
        files = '; [[ "$cur" != -* ]] && COMPREPLY=($(compgen -f -- "$cur")) && return' \
            if name in FILES else ""
        cases.append(f'        {name}) words="{words}"{files} ;;')
    return (
        _BASH.replace("@COMMANDS@", " ".join(commands))
        .replace("@GLOBAL@", " ".join(_options(parser)))
        .replace("@CASES@", "\n".join(cases))
    )


def _fish(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser]) -> str:
    lines = [_FISH_HEAD.rstrip("\n")]
    first = "__fish_use_subcommand"
    for a in parser._actions:
        for option in a.option_strings:
            if option.startswith("--"):
                value = " -r" if option in GLOBAL_VALUES else ""
                lines.append(f"complete -c hivectl -n {first} -l {option[2:]}{value}")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    for name, p in commands.items():
        lines.append(f"complete -c hivectl -n {first} -a {name} -d {_fish_quote(helps.get(name, ''))}")
        seen = f'"__fish_seen_subcommand_from {name}"'
        for option in _options(p):
            lines.append(f"complete -c hivectl -n {seen} -l {option[2:]}")
        if _choices(p):
            lines.append(f"complete -c hivectl -n {seen} -a {_fish_quote(' '.join(_choices(p)))}")
        if name in WORDS:
            lines.append(f"complete -c hivectl -n {seen} -a "
                         f'"(hivectl completion --words {WORDS[name]} 2>/dev/null)"')
        if name in FILES:
            lines.append(f"complete -c hivectl -n {seen} -F")
    return "\n".join(lines) + "\n"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
