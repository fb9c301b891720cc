"""Chat and instruction data: records rendered into token ids with a loss mask.

``data.format`` says how a record becomes tokens (``optjob.specs.datafile`` detects it from the
first record when the spec does not say):

- ``chat``: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``,
  rendered with the tokenizer's chat template (``DEFAULT_CHAT_TEMPLATE`` when it has none, e.g. the
  builtin tokenizer; the template is saved with every output model's tokenizer);
- ``prompt-completion``: ``{"prompt": ..., "completion": ...}``: the prompt's tokens, the
  completion's, then EOS.

With ``loss_on: completion`` (the default) only the assistant replies (each with the end-of-turn
text the template puts after it) and the completions (with their EOS) carry loss; every other
token is context, labelled -100. A reply's span is found by rendering the conversation up to it
with the generation prompt and up to its end: the template must render a conversation's prefix as
a prefix of the whole (every common template does; one that does not is an error naming the fix).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optjob.specs.data import DataSpec
from optjob.specs.datafile import detect_format, first_record, jsonl_files, read_records, record_problem
from optjob.specs.errors import StepError

#: The chat template given to a tokenizer that has none (the builtin one): role tags as plain text,
#: each assistant reply closed by the EOS token.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def data_format(data: DataSpec) -> str:
    """``data.format``, or the format of the first record of a .jsonl source (text otherwise)."""
    if data.format is not None:
        return data.format
    if data.kind == "builtin":
        return "text"
    if data.kind == "hf":
        return detect_format(next(iter(_hub_rows(data.source, data)), None))
    try:
        return detect_format(first_record(jsonl_files(data.source)))
    except (OSError, ValueError):
        return "text"  # the text reader names the problem


def load_records(source: str, data: DataSpec, fmt: str) -> list[dict[str, Any]]:
    """Every record of ``source`` (a local .jsonl file or folder, or a hub dataset), each checked
    against ``fmt``: the first bad one is an error naming its line."""
    out: list[dict[str, Any]] = []
    if source.startswith("hf:"):
        for n, row in enumerate(_hub_rows(source, data)):
            problem = record_problem(row, fmt, data.text_field)
            if problem is not None:
                raise StepError(f"{source} row {n}: {problem}")
            out.append(row)
        return out
    files = jsonl_files(source)
    if not files:
        path = Path(source).expanduser()
        what = "does not exist" if not path.exists() else "holds no .jsonl records"
        raise StepError(f"data source {source!r} {what} (format {fmt} reads .jsonl records)")
    for file in files:
        try:
            for n, record in read_records(file):
                problem = record_problem(record, fmt, data.text_field)
                if problem is not None:
                    raise StepError(f"{file}:{n}: {problem}")
                out.append(record)
        except (OSError, ValueError) as exc:  # not JSON, not UTF-8, unreadable
            raise StepError(f"cannot read data file {str(file)!r}: {exc}") from None
    if not out:
        raise StepError(f"data source {source!r} holds no records")
    return out


def _hub_rows(source: str, data: DataSpec) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise StepError(f"data source {source!r}: hub datasets need network and the `datasets` package") from None
    parts = source[3:].split("/")
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    try:
        ds = datasets.load_dataset(repo, config, split="train")
    except Exception as exc:  # offline, unknown, gated
        raise StepError(f"could not load hub dataset {source!r}: {exc} (needs network on the node)") from None
    for row in ds:
        yield dict(row)


def cap_records(records: list[dict[str, Any]], chars: int | None) -> list[dict[str, Any]]:
    """The leading records whose text adds up to at most ``chars`` characters (at least one)."""
    if chars is None:
        return records
    out: list[dict[str, Any]] = []
    total = 0
    for record in records:
        total += len(record_text(record))
        if out and total > chars:
            break
        out.append(record)
    return out


def record_text(record: dict[str, Any]) -> str:
    """A record's words with its role tags: what the builtin tokenizer is trained on."""
    if "messages" in record:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in record["messages"])
    return f"{record.get('prompt', '')}{record.get('completion', '')}"


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template ``DEFAULT_CHAT_TEMPLATE``."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # a template that refuses a role order, a missing template
        raise StepError(f"the chat template cannot render this conversation: {exc}") from None
    return str(text)


def chat_segments(tokenizer: Any, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, carries loss) pieces: each assistant reply (with what the
    template closes it with) carries loss, everything else is context."""
    full = _render(tokenizer, messages, False)
    out: list[tuple[str, bool]] = []
    pos = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True) if k else ""
        upto = _render(tokenizer, messages[: k + 1], False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
            raise StepError("the tokenizer's chat template does not render a conversation's beginning as the "
                            "beginning of the whole, so the assistant replies cannot be told apart",
                            hint="set data.loss_on: all")
        out.append((full[pos : len(before)], False))
        out.append((full[len(before) : len(upto)], True))
        pos = len(upto)
    out.append((full[pos:], False))
    return [(text, loss) for text, loss in out if text]


def encode_record(tokenizer: Any, record: dict[str, Any], fmt: str) -> tuple[list[int], list[bool]]:
    """(token ids, carries loss) of one chat or prompt-completion record."""
    if fmt == "chat":
        pieces = chat_segments(tokenizer, record["messages"])
    else:
        pieces = [(record["prompt"], False), (record["completion"], True)]
    ids: list[int] = []
    mask: list[bool] = []
    for text, loss in pieces:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(part)
        mask.extend([loss] * len(part))
    if fmt == "prompt-completion":
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.append(int(eos))
            mask.append(True)
    return ids, mask
