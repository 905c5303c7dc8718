"""`surgery eval --tasks`: lm-eval on the loaded model, offline, with a task defined from a local file."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="pip install 'surgery[lm-eval]'")
pytest.importorskip("accelerate", reason="pip install 'surgery[lm-eval]'")

ROWS = [
    {"question": "def f(x):\n   ", "choices": [" return x", " banana split"], "answer": 0},
    {"question": "import", "choices": [" os", " the", " ((("], "answer": 0},
    {"question": "for i in", "choices": [" purple cows", " range(10):"], "answer": 1},
    {"question": "The default value is", "choices": [" None.", " )))(((::"], "answer": 0},
    {"question": "class Foo", "choices": ["(object):", " the"], "answer": 0},
    {"question": "Return a new", "choices": [" list", " 0x"], "answer": 0},
]


def _task(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    task = tmp_path / "pychoice.yaml"
    task.write_text(f"""task: surgery_python_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return task


def _direct_accuracy(folder) -> float:
    """Pick, per row, the choice whose continuation tokens the model finds most likely, the request
    built as lm-eval builds a multiple-choice one: continuation = " " (its target delimiter) + choice,
    the context's trailing whitespace moved onto the continuation, and the continuation's tokens
    those of context + continuation past the context's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    correct = 0
    for row in ROWS:
        scores = []
        for choice in row["choices"]:
            text, continuation = row["question"], " " + choice
            spaces = len(text) - len(text.rstrip())
            if spaces:
                text, continuation = text[:-spaces], text[-spaces:] + continuation
            context = tokenizer(text)["input_ids"]
            whole = tokenizer(text + continuation)["input_ids"]
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return correct / len(ROWS)


def test_tasks_from_a_local_file_run_on_the_loaded_model(cli, tmp_path, monkeypatch):
    from surgery.demo_models import demo_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = _task(tmp_path)
    result = cli("eval", demo_model("prose"), "--compare", demo_model("base"), "--max-tokens", 256,
                 "--tasks", str(task), "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["tasks"]["surgery_python_choice"]["acc"] == pytest.approx(_direct_accuracy(demo_model("prose")))
    assert data["base_tasks"]["surgery_python_choice"]["acc"] == pytest.approx(_direct_accuracy(demo_model("base")))


def test_unknown_task_is_one_clear_line(cli, tmp_path):
    from surgery.demo_models import demo_model

    result = cli("eval", demo_model("base"), "--tasks", "no_such_task_xyz")
    assert result.code == 2 and "knows no task 'no_such_task_xyz'" in result.err
    result = cli("eval", demo_model("base"), "--tasks", str(tmp_path / "missing.yaml"))
    assert result.code == 2 and "does not exist" in result.err
