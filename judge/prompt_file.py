"""The judge's system message from a file (`judge.prompt_file`): another wording, the same protocol.

Only the system message changes. The user message (the annotation items as `<infoK>` lines and the
response between `<<<RESPONSE` and `RESPONSE>>>`) and the verdict parsing stay ours, so the file must tell
the judge to answer with `<infoK>0|1</infoK>` tags. `{examples}` in the file is replaced by our three worked
examples (in the user message's own format). The file is read once, on the driver, and its text travels
to the judge's replicas; docs/judge-prompt.txt is our prompt written this way (a starting point).
"""

from __future__ import annotations

from pathlib import Path

from judge.verdicts import SYSTEM_PROMPT, WORKED_EXAMPLES

EXAMPLES = "{examples}"
MAX_CHARS = 100_000


def load_system_prompt(path: str | None, *, field: str = "judge.prompt_file") -> str:
    """The system message `path` holds (ours for None); ValueError naming the field, the file and the fix."""
    if path is None:
        return SYSTEM_PROMPT
    where = f"{field}={path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file (relative paths are read from the folder the run starts in); "
                         "fix the path or drop the field to use the built-in prompt") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot be read ({e.strerror or e}); fix the path or its permissions") from None
    return system_prompt_from(text, where=where)


def system_prompt_from(text: str, *, where: str) -> str:
    """`text` with `{examples}` filled in, after the checks that keep the verdict protocol usable."""
    if not text.strip():
        raise ValueError(f"{where}: the file is empty; write the judge's instruction into it "
                         "(docs/judge-prompt.txt is ours)")
    if len(text) > MAX_CHARS:
        raise ValueError(f"{where}: {len(text):,} characters, over the {MAX_CHARS:,} a system message may hold here; "
                         "shorten it")
    if "<info" not in text.replace(EXAMPLES, WORKED_EXAMPLES):
        raise ValueError(f"{where}: the prompt never shows the judge the <infoK>1</infoK> / <infoK>0</infoK> answer "
                         "tags its verdicts are read from; describe them, or put {examples} where our worked "
                         "examples should go")
    return text.replace(EXAMPLES, WORKED_EXAMPLES)
