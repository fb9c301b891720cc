"""``evaluate: {tasks: [...]}``: lm-evaluation-harness on the model in memory, offline on a local task.

The reference: a multiple-choice task scored by hand with the same model, by lm-eval 0.4.13's
definitions (lm_eval/api/model.py ``_encode_pair``: the context's trailing space moves to the
continuation, the pair is encoded whole and split at the context's length; lm_eval/api/task.py
``process_results``, multiple_choice: ``acc`` is argmax of the choices' log-likelihoods,
``acc_norm`` argmax of the log-likelihoods divided by each choice's length in characters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.manager.cli import main
from optjob.specs import EvaluateStep
from optjob.specs.errors import SpecError
from optjob.specs.evaltasks import check_tasks, name_problem, registry_names
from optjob.specs.loader import load_spec, loads_spec
from optjob.steps.evaluate import run
from optjob.steps.tasks import metric_name, task_config, task_metrics

pytest.importorskip("lm_eval", reason="the eval extra (pip install 'optjob[eval]') is not installed")

TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "tiny_mc.yaml"
DOCS = [json.loads(line) for line in (TASK.parent / "tiny_mc.jsonl").read_text().splitlines()]


@torch.no_grad()
def _loglikelihood(model: Any, tok: Any, context: str, continuation: str) -> float:
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _reference(model: Any, tok: Any) -> dict[str, float]:
    acc = norm = 0
    for doc in DOCS:
        lls = torch.tensor([_loglikelihood(model, tok, doc["question"], " " + c) for c in doc["choices"]])
        lengths = torch.tensor([float(len(c)) for c in doc["choices"]])
        acc += int(lls.argmax()) == doc["answer"]
        norm += int((lls / lengths).argmax()) == doc["answer"]
    return {"task:tiny_mc:acc": acc / len(DOCS), "task:tiny_mc:acc_norm": norm / len(DOCS)}


def test_a_local_task_scores_as_the_reference_does(tiny_model: Any) -> None:
    ctx, model = tiny_model
    got = task_metrics(model, ctx.tokenizer, EvaluateStep(tasks=[str(TASK)], batch_size=4))
    assert got == pytest.approx(_reference(model, ctx.tokenizer))


def test_the_model_in_memory_is_what_is_scored(tiny_model: Any, tmp_path: Path) -> None:
    """A hook that favours the right answers' tokens takes acc to 1; one that favours the wrong ones
    below a half: lm-eval scored this very object (no download, no copy from disk). Through the evaluate step."""
    ctx, model = tiny_model
    tok = ctx.tokenizer

    def favour(right: bool) -> torch.Tensor:
        ids = {t for d in DOCS for k, c in enumerate(d["choices"]) if (k == d["answer"]) == right
               for t in tok.encode(" " + c, add_special_tokens=False)}
        other = {t for d in DOCS for k, c in enumerate(d["choices"]) if (k == d["answer"]) != right
                 for t in tok.encode(" " + c, add_special_tokens=False)}
        boost = torch.zeros(len(tok))
        boost[sorted(ids - other)] = 30.0
        return boost

    step = EvaluateStep(metrics=["size"], tasks=[str(TASK)], batch_size=4)
    for right in (True, False):
        boost = favour(right)
        handle = model.lm_head.register_forward_hook(lambda _m, _i, out, b=boost: out + b)
        try:
            metrics = run(ctx, step, model).metrics
        finally:
            handle.remove()
        assert metrics["task:tiny_mc:acc"] == 1.0 if right else metrics["task:tiny_mc:acc"] < 0.5
        assert metrics["params"] > 0  # the other metrics are still measured


def test_relative_data_files_are_from_the_task_files_folder(tmp_path: Path) -> None:
    config = task_config(TASK)
    assert config["dataset_kwargs"]["data_files"] == {"test": str(TASK.parent / "tiny_mc.jsonl")}
    assert config["task"] == "tiny_mc"


@pytest.mark.parametrize(("key", "name"), [
    ("acc,none", "task:t:acc"), ("acc_norm,none", "task:t:acc_norm"), ("acc_stderr,none", None),
    ("exact_match,strict-match", "task:t:exact_match@strict-match"), ("alias", None), ("sample_len", None),
])
def test_metric_names(key: str, name: str | None) -> None:
    assert metric_name("t", key) == name


# ---- checked at validate ---------------------------------------------------------------------------


def test_registry_names_are_known_and_typos_are_refused_with_a_suggestion() -> None:
    assert {"hellaswag", "arc_easy", "mmlu", "winogrande"} <= registry_names()
    assert name_problem("hellaswag") is None and name_problem("my/task.yaml") is None
    spec = "name: x\nmodel: {init: {}}\nsteps:\n  - evaluate: {tasks: [arc_easy, hellaswg]}\n"
    with pytest.raises(SpecError) as err:
        loads_spec(spec, "spec.yaml")
    assert str(err.value).startswith("spec.yaml:4:34: steps[0].evaluate.tasks[1]: unknown lm-eval task 'hellaswg'")
    assert "did you mean hellaswag" in str(err.value) and err.value.exit_code == 2
    assert loads_spec(spec.replace("hellaswg", "hellaswag")).pipeline[0].tasks == ["arc_easy", "hellaswag"]


def test_task_files_are_checked(tmp_path: Path) -> None:
    (tmp_path / "nodata.yaml").write_text("task: t\ndataset_path: json\n"
                                          "dataset_kwargs: {data_files: {test: x.jsonl}}\n")
    (tmp_path / "noname.yaml").write_text("dataset_path: json\n")
    (tmp_path / "fn.yaml").write_text(f"include: {TASK}\ntask: fn\nprocess_docs: !function utils.docs\n")
    spec = loads_spec("name: x\nmodel: {init: {}}\nsteps:\n  - evaluate:\n      tasks: [missing.yaml, nodata.yaml, "
                      f"noname.yaml, fn.yaml, {TASK}]\n")
    problems = check_tasks(spec, tmp_path)
    assert [loc[-1] for loc, _ in problems] == [0, 1, 2]
    assert "missing.yaml does not exist" in problems[0][1]
    assert f"data file {tmp_path / 'x.jsonl'} does not exist" in problems[1][1]
    assert "names its task" in problems[2][1]


def test_the_cli_refuses_an_unknown_task_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nmodel: {init: {}}\nsteps:\n  - evaluate: {tasks: [no_such_task_at_all]}\n")
    with pytest.raises(SystemExit) as done:
        main(["validate", str(path)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:4:" in err[0] and "unknown lm-eval task 'no_such_task_at_all'" in err[0]
    path.write_text(f"name: x\nmodel: {{init: {{}}}}\nsteps:\n  - evaluate: {{tasks: [{TASK}]}}\n")
    assert load_spec(path).pipeline[0].tasks == [str(TASK)]


def test_the_plan_counts_the_tasks() -> None:
    none, two = EvaluateStep(), EvaluateStep(tasks=["hellaswag", "arc_easy"], task_limit=100)
    assert none.task_tokens() == 0
    assert two.task_tokens() == 2 * 100 * 512
    assert EvaluateStep(tasks=["hellaswag"]).task_tokens() == 5_000 * 512


def test_a_dry_run_scores_a_few_local_examples_and_leaves_registry_tasks_to_the_node(
        tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.steps import tasks

    ctx, model = tiny_model
    ctx.dry_run = True
    asked: list[EvaluateStep] = []

    def spy(m: Any, tok: Any, step: EvaluateStep) -> dict[str, float]:
        asked.append(step)
        return task_metrics(m, tok, step)

    monkeypatch.setattr(tasks, "task_metrics", spy)
    metrics = run(ctx, EvaluateStep(metrics=["size"], tasks=["hellaswag", str(TASK)]), model).metrics
    assert [(s.tasks, s.task_limit) for s in asked] == [([str(TASK)], 4)]  # offline here: hellaswag would fail
    assert "task:tiny_mc:acc" in metrics and not any(k.startswith("task:hellaswag") for k in metrics)
    (check,) = [e for e in ctx.events() if e["event"] == "check"]
    assert check["what"] == "tasks" and check["skipped"] == ["hellaswag"] and "network" in check["detail"]


def test_a_registry_task_without_the_network_is_one_step_error(tiny_model: Any) -> None:
    from optjob.specs.errors import StepError

    ctx, model = tiny_model
    with pytest.raises(StepError, match=r"lm-eval could not run tasks arc_easy: .*the node needs the network"):
        task_metrics(model, ctx.tokenizer, EvaluateStep(tasks=["arc_easy"], task_limit=2))
