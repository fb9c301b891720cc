"""Chat and instruction data: records rendered with a chat template, loss only on the assistant's
replies / the completions (prompt tokens carry label -100 and no gradient), format detection, a
separate eval file, record checks at validate naming the data file's line, and a whole run on chat
records with a LoRA adapter whose output loads with plain transformers and keeps the template."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import JobSpec, SpecError, load_spec
from optjob.specs.errors import StepError
from optjob.steps.chat import DEFAULT_CHAT_TEMPLATE, data_format, encode_record
from optjob.steps.data import IGNORE_INDEX, Corpus, MaskedCorpus, build_corpus, load_text
from optjob.steps.evaluate import eval_loss
from optjob.steps.tokenizer import load_tokenizer
from optjob.steps.train import masked_lm_loss

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
SYSTEM = "Reverse the words."


def _chat(rng: random.Random) -> dict[str, Any]:
    q = " ".join(rng.choice(WORDS) for _ in range(8))
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                         {"role": "assistant", "content": " ".join(reversed(q.split()))}]}


def _pc(rng: random.Random) -> dict[str, Any]:
    q = " ".join(rng.choice(WORDS) for _ in range(8))
    return {"prompt": f"Reverse: {q}\nAnswer:", "completion": " " + " ".join(reversed(q.split()))}


def _write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _spec(source: Path, **data: Any) -> JobSpec:
    return JobSpec.model_validate({
        "name": "chat", "model": {"init": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 512}},
        "data": {"source": str(source), "seq_len": 32, **data},
        "steps": [{"train": {"max_steps": 2}}]})  # fmt: skip


def _corpus(spec: JobSpec, cache: Path) -> tuple[Any, Any]:
    text = load_text(spec.data, cache)
    tok = load_tokenizer(spec, text, cache)
    return build_corpus(spec, tok, cache, dry_run=False, text=text), tok


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    rng = random.Random(0)
    return _write(tmp_path / "chat.jsonl", [_chat(rng) for _ in range(200)])


def test_chat_records_are_masked_to_the_assistant_replies(chat_file: Path, shared_cache: Path) -> None:
    spec = _spec(chat_file)
    assert spec.data.format is None and data_format(spec.data) == "chat"  # detected from the first record
    corpus, tok = _corpus(spec, shared_cache)
    assert isinstance(corpus, MaskedCorpus) and tok.chat_template == DEFAULT_CHAT_TEMPLATE

    record = json.loads(chat_file.read_text().splitlines()[0])
    ids, mask = encode_record(tok, record, "chat")
    reply = record["messages"][2]["content"]
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    context = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert trained == reply + tok.eos_token + "\n"  # the reply and the end of its turn, nothing else
    assert SYSTEM in context and record["messages"][1]["content"] in context and reply not in context
    assert tok.decode(ids) == tok.apply_chat_template(record["messages"], tokenize=False)

    # Batches: labels are the next tokens where they belong to a reply, -100 everywhere else.
    for step in range(5):
        batch, labels = corpus.train_batch(4, step, 0), corpus.train_labels(4, step, 0)
        assert labels.shape == (4, 32)
        keep = labels != IGNORE_INDEX
        assert torch.equal(labels[keep], batch[:, 1:][keep])
        assert 0 < int(keep.sum()) < keep.numel()
        for row, lab in zip(batch, labels, strict=True):
            masked_text = tok.decode(row[1:][lab == IGNORE_INDEX])
            assert SYSTEM not in tok.decode(row[1:][lab != IGNORE_INDEX]) and "<|user|>" not in tok.decode(
                row[1:][lab != IGNORE_INDEX])
            assert masked_text  # some context in every 32-token row of these records
    assert torch.equal(corpus.train_labels(4, 3, 7), corpus.train_labels(4, 3, 7))  # a pure function


def test_prompt_tokens_carry_no_loss_and_no_gradient() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX]])
    logits = torch.randn(1, 5, 16, requires_grad=True)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> Any:
            return type("Out", (), {"logits": logits})()

    loss = masked_lm_loss(Fixed(), ids, labels)
    loss.backward()
    grad = logits.grad
    assert grad is not None
    assert torch.count_nonzero(grad[0, [0, 1, 4]]) == 0  # prompt positions: no gradient at all
    assert torch.count_nonzero(grad[0, 2]) > 0 and torch.count_nonzero(grad[0, 3]) > 0
    expected = torch.nn.functional.cross_entropy(logits[0, 2:4].detach(), torch.tensor([8, 9]))
    assert float(loss.detach()) == pytest.approx(float(expected))
    # Every target masked: loss 0, not NaN (a row of prompt only).
    none = masked_lm_loss(Fixed(), ids, torch.full_like(labels, IGNORE_INDEX))
    assert float(none) == 0.0


def test_prompt_completion_records(tmp_path: Path, shared_cache: Path) -> None:
    rng = random.Random(1)
    source = _write(tmp_path / "pc.jsonl", [_pc(rng) for _ in range(200)])
    spec = _spec(source)
    assert data_format(spec.data) == "prompt-completion"
    corpus, tok = _corpus(spec, shared_cache)
    assert isinstance(corpus, MaskedCorpus)
    record = json.loads(source.read_text().splitlines()[0])
    ids, mask = encode_record(tok, record, "prompt-completion")
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == record["completion"] + tok.eos_token
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if not m]) == record["prompt"]


def test_loss_on_all_trains_on_every_token(chat_file: Path, shared_cache: Path) -> None:
    corpus, _ = _corpus(_spec(chat_file, loss_on="all"), shared_cache)
    assert type(corpus) is Corpus and not corpus.masked


def test_eval_source_is_the_eval_split(chat_file: Path, tmp_path: Path, shared_cache: Path) -> None:
    rng = random.Random(7)
    held = _write(tmp_path / "held.jsonl", [_chat(rng) for _ in range(20)])
    corpus, tok = _corpus(_spec(chat_file, eval_source=str(held)), shared_cache)
    expected: list[int] = []
    for line in held.read_text().splitlines():
        expected.extend(encode_record(tok, json.loads(line), "chat")[0])
    assert corpus.eval_ids.tolist() == expected
    assert len(corpus.train_ids) == sum(len(encode_record(tok, json.loads(x), "chat")[0])
                                        for x in chat_file.read_text().splitlines())
    labels = list(corpus.eval_labels(4))
    assert len(labels) == len(list(corpus.eval_batches(4)))


def test_text_eval_source(tmp_path: Path, shared_cache: Path) -> None:
    text = " ".join(random.Random(3).choice(WORDS) for _ in range(3000))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(text[:2000])
    corpus, tok = _corpus(_spec(tmp_path / "train.txt", eval_source=str(tmp_path / "eval.txt")), shared_cache)
    assert corpus.eval_ids.tolist() == tok(text[:2000], add_special_tokens=False)["input_ids"]
    (tmp_path / "tiny.txt").write_text("alpha beta")
    with pytest.raises(StepError, match="eval set has"):
        _corpus(_spec(tmp_path / "train.txt", eval_source=str(tmp_path / "tiny.txt")), shared_cache)


def test_masked_eval_counts_only_the_replies(chat_file: Path, shared_cache: Path) -> None:
    from optjob.steps.modeling import initial_model

    spec = _spec(chat_file)
    corpus, tok = _corpus(spec, shared_cache)
    model = initial_model(spec, tok)
    loss, acc = eval_loss(model, corpus, 4, None, torch.device("cpu"))
    # By hand: cross-entropy over the reply targets of every eval window.
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, labels in zip(corpus.eval_batches(4), corpus.eval_labels(4), strict=True):
            logits = model(input_ids=batch[:, :-1]).logits
            keep = labels != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    assert count > 0 and loss == pytest.approx(total / count, rel=1e-5) and 0 <= acc <= 1


# ---- records checked at validate ---------------------------------------------------------------------------


def _spec_file(tmp_path: Path, source: Path, extra: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: chat\nmodel:\n  init: {{layers: 2, hidden: 64, heads: 2}}\ndata:\n"
                    f"  source: {source}\n{extra}steps:\n  - train: {{max_steps: 2}}\n")
    return path


def test_a_record_without_its_fields_is_a_spec_error_naming_the_line(tmp_path: Path) -> None:
    rng = random.Random(2)
    records: list[Any] = [_chat(rng) for _ in range(5)]
    records[3] = {"messages": [{"role": "user", "content": "hi"}]}  # line 4: no assistant reply
    source = _write(tmp_path / "data.jsonl", records)
    with pytest.raises(SpecError) as info:
        load_spec(_spec_file(tmp_path, source))
    assert info.value.exit_code == 2
    line = info.value.errors[0]
    assert f"{source}:4: no assistant message" in line and "data.source" in line
    assert line.startswith(f"{tmp_path / 'spec.yaml'}:5:")  # the spec's line of data.source

    records[3] = {"prompt": "x", "completion": "y"}  # another format than the first record's
    _write(source, records)
    with pytest.raises(SpecError, match=r"data\.jsonl:4: no field 'messages'"):
        load_spec(_spec_file(tmp_path, source))

    _write(source, [{"text": "plain"}, {"body": "no text"}])
    with pytest.raises(SpecError, match=r"data\.jsonl:2: no field 'text'"):
        load_spec(_spec_file(tmp_path, source))

    source.write_text(json.dumps(_chat(rng)) + "\n{not json\n")
    with pytest.raises(SpecError, match=r"data\.jsonl:2: not valid JSON"):
        load_spec(_spec_file(tmp_path, source))

    robot = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    _write(source, [_chat(rng), robot])
    with pytest.raises(SpecError, match=r"messages\[0\]\.role is 'robot'"):
        load_spec(_spec_file(tmp_path, source))


def test_format_given_is_checked_and_eval_source_too(tmp_path: Path) -> None:
    rng = random.Random(4)
    good = _write(tmp_path / "good.jsonl", [_chat(rng) for _ in range(3)])
    bad = _write(tmp_path / "held.jsonl", [_chat(rng), {"prompt": "p", "completion": "c"}])
    spec = load_spec(_spec_file(tmp_path, good, "  format: chat\n"))
    assert spec.data.format == "chat"
    with pytest.raises(SpecError, match=r"data\.eval_source: .*held\.jsonl:2: no field 'messages'"):
        load_spec(_spec_file(tmp_path, good, f"  eval_source: {bad}\n"))
    with pytest.raises(SpecError, match=r"good\.jsonl:1: no field 'prompt'"):
        load_spec(_spec_file(tmp_path, good, "  format: prompt-completion\n"))
    with pytest.raises(SpecError, match="needs records"):
        load_spec(_spec_file(tmp_path, tmp_path / "x.txt", "  format: chat\n"))
    # A local data file that is not there is refused when the spec is read, not after a paid launch
    # (apply uploads local data from this machine: a file it cannot find here never reaches the node).
    with pytest.raises(SpecError, match=r"data\.source: .*elsewhere\.jsonl does not exist"):
        load_spec(_spec_file(tmp_path, tmp_path / "elsewhere.jsonl"))


def test_validate_cli_exits_2_with_the_data_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    source = _write(tmp_path / "data.jsonl", [_chat(random.Random(5)), {"messages": []}])
    proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "validate", str(_spec_file(tmp_path, source))],
                          capture_output=True, text=True, timeout=60, env={**__import__("os").environ,
                                                                           "OPTJOB_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{source}:2: messages must be a non-empty list" in proc.stderr and "Traceback" not in proc.stderr


# ---- a whole run on chat records ----------------------------------------------------------------------------


@pytest.mark.slow
def test_run_on_chat_records_with_lora(chat_file: Path, tmp_path: Path, shared_cache: Path,
                                       capsys: pytest.CaptureFixture[str], restore_signals: None) -> None:
    pytest.importorskip("peft")
    from optjob.steps import runner
    from optjob.steps.events import parse_event
    from optjob.steps.layout import JobFile, step_dir
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(chat_file).model_dump(mode="json")
    spec["steps"] = [{"train": {"max_steps": 30, "lr": 1e-2, "batch_size": 8, "eval_every": 15, "eval_batches": 4,
                                "adapter": {"r": 8, "alpha": 16, "dropout": 0.0}, "checkpoint_every": 10}}]
    folder = tmp_path / "job"
    JobFile(spec=spec, dry_run=False, device="cpu", cache_dir=str(shared_cache),
            extra={"auto_evaluate": {"latency_repeats": 1, "generate_tokens": 4, "max_batches": 2}}).write(folder)
    assert runner.main(["run", str(folder)]) == 0
    events = [e for e in map(parse_event, capsys.readouterr().out.splitlines()) if e is not None]
    evals = [e["metrics"]["eval_loss"] for e in events if e["event"] == "metrics" and e.get("kind") == "train"]
    assert len(evals) == 2 and evals[1] < evals[0]  # the masked eval loss on the replies falls
    done = next(e for e in events if e["event"] == "step_done" and e["kind"] == "train")
    assert 0 < done["metrics"]["trainable_params"] < done["metrics"]["params"]

    out = step_dir(folder, 0, "train")
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # merged: no peft needed
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # the template travels with the model
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert (out / "adapter" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_config(model.config)  # the adapter's keys match the architecture
    assert isinstance(PeftModel.from_pretrained(base, out / "adapter"), PeftModel)
