"""mergekit configs as they are: each form and method translated into the surgery plan that makes the same
model (byte for byte the hand-written plan's output, on the trained demo models), `surgery check` showing
the translation, mergekit's parameter precedence folded into surgery's conditions, and every key or value
with no exact translation refused in one line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from surgery.plan.mergekit import Untranslatable, translate
from tests.conftest import listing, write_plan
from tests.test_task_vectors import _weights


@pytest.fixture(scope="module")
def demo():
    from surgery.demo_models import demo_model

    models = {name: demo_model(name) for name in ("base", "prose", "code")}
    models["n"] = json.loads((models["base"] / "config.json").read_text())["num_hidden_layers"]
    return models


def _filled(text: str, demo: dict) -> str:
    return text.format(**demo)


def _run(cli, tmp_path: Path, text: str, name: str) -> Path:
    """Apply a mergekit config or a surgery plan into tmp_path/name."""
    out = tmp_path / name
    plan = write_plan(tmp_path, text, f"{name}.yaml")
    result = cli("apply", plan, "--out", out, "--no-fsync")
    assert result.code == 0, result.err
    return out


def _assert_same_model(got: Path, want: Path) -> None:
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].view(-1).view(dtype=_bytes(a[name])).equal(
            b[name].view(-1).view(dtype=_bytes(b[name]))), name
    assert json.loads((got / "config.json").read_text()) == json.loads((want / "config.json").read_text())


def _bytes(tensor: torch.Tensor) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]


# (mergekit config, the surgery plan written by hand that makes the same model)
SAME_MODEL = {
    "task_arithmetic": ("""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {prose}
    parameters: {{weight: 0.7}}
  - model: {code}
    parameters:
      weight: [0.2, 0.6]
parameters:
  normalize: true
  int8_mask: true
""", """
model: {base}
base: {base}
steps:
  - op: task_arithmetic
    normalize: true
    models:
      - {{model: {prose}, weight: 0.7}}
      - {{model: {code}, weight: [0.2, 0.6]}}
"""),
    # the slice form; weight set on one model by filter, on the slice, and density on the slice by filter and
    # on the config: each level falls through to the next where its filters do not match
    "ties precedence": ("""
merge_method: ties
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, {n}]
      - model: {prose}
        layer_range: [0, {n}]
        parameters:
          weight: [{{filter: self_attn, value: 0.9}}]
      - model: {code}
        layer_range: [0, {n}]
    parameters:
      weight: 0.5
      density: [{{filter: mlp, value: 0.3}}]
parameters:
  density: 0.6
  lambda: 0.8
dtype: float32
""", """
model: {base}
base: {base}
steps:
  - op: ties
    lambda: 0.8
    dtype: float32
    models:
      - model: {prose}
        weight: [{{filter: self_attn, value: 0.9}}, {{value: 0.5}}]
        density: [{{filter: mlp, value: 0.3}}, {{value: 0.6}}]
      - model: {code}
        weight: 0.5
        density: [{{filter: mlp, value: 0.3}}, {{value: 0.6}}]
"""),
    # mergekit's own example: t as gradients by module, written in bfloat16
    "slerp": ("""
slices:
  - sources:
      - model: {prose}
        layer_range: [0, {n}]
      - model: {code}
        layer_range: [0, {n}]
merge_method: slerp
base_model: {prose}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""", """
model: {prose}
steps:
  - op: slerp
    dtype: bfloat16
    models: [{prose}, {code}]
    t:
      - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
      - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
      - {{value: 0.5}}
"""),
    "linear": ("""
merge_method: linear
models:
  - model: {prose}
    parameters: {{weight: 1.0}}
  - model: {code}
    parameters: {{weight: "0.5"}}
""", """
steps:
  - op: linear
    models: [{{model: {prose}, weight: 1.0}}, {{model: {code}, weight: 0.5}}]
"""),
    # mergekit's density default is 1 (keep everything); DARE's drop is seeded (0) in surgery
    "dare_ties": ("""
merge_method: dare_ties
base_model: {base}
models:
  - model: {prose}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {code}
    parameters: {{weight: 0.4}}
""", """
model: {base}
base: {base}
steps:
  - op: dare_ties
    models: [{{model: {prose}, weight: 0.6, density: 0.5}}, {{model: {code}, weight: 0.4, density: 1.0}}]
"""),
    "della_linear": ("""
merge_method: della_linear
base_model: {base}
models:
  - model: {prose}
    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}
  - model: {code}
    parameters: {{weight: 0.4, density: 0.7, epsilon: 0.2}}
parameters: {{lambda: 1.1}}
""", """
model: {base}
base: {base}
steps:
  - op: della_linear
    lambda: 1.1
    models:
      - {{model: {prose}, weight: 0.6, density: 0.5, epsilon: 0.1}}
      - {{model: {code}, weight: 0.4, density: 0.7, epsilon: 0.2}}
"""),
    "breadcrumbs_ties": ("""
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {prose}
    parameters: {{weight: 1.0, density: 0.8, gamma: 0.02}}
  - model: {code}
    parameters: {{weight: 1.0, density: 0.8, gamma: 0.02}}
""", """
model: {base}
base: {base}
steps:
  - op: breadcrumbs_ties
    models:
      - {{model: {prose}, weight: 1.0, density: 0.8, gamma: 0.02}}
      - {{model: {code}, weight: 1.0, density: 0.8, gamma: 0.02}}
"""),
    "sce": ("""
merge_method: sce
base_model: {base}
models:
  - model: {prose}
  - model: {code}
parameters: {{select_topk: 0.5}}
""", """
model: {base}
base: {base}
steps:
  - op: sce
    select_topk: 0.5
    models: [{prose}, {code}]
"""),
    "model_stock": ("""
merge_method: model_stock
base_model: {base}
models:
  - model: {prose}
  - model: {code}
""", """
model: {base}
base: {base}
steps:
  - op: model_stock
    models: [{prose}, {code}]
"""),
    # the models form lists the base among the merged models when the config leaves it out
    "karcher": ("""
merge_method: karcher
base_model: {base}
models:
  - model: {prose}
  - model: {code}
parameters: {{max_iter: 5}}
""", """
model: {base}
steps:
  - op: karcher
    max_iter: 5
    models: [{prose}, {code}, {base}]
"""),
    "nuslerp": ("""
merge_method: nuslerp
models:
  - model: {prose}
    parameters: {{weight: 0.3}}
  - model: {code}
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_row_wise: true, nuslerp_flatten: false}}
""", """
steps:
  - op: nuslerp
    row_wise: true
    flatten: false
    models: [{{model: {prose}, weight: 0.3}}, {{model: {code}, weight: 0.7}}]
"""),
    "multislerp": ("""
merge_method: multislerp
base_model: {base}
models:
  - model: {prose}
    parameters: {{weight: 0.5}}
  - model: {code}
    parameters: {{weight: 0.5}}
""", """
model: {base}
base: {base}
steps:
  - op: multislerp
    models: [{{model: {prose}, weight: 0.5}}, {{model: {code}, weight: 0.5}}]
"""),
    # passthrough's one-source slices are a chain; [FIRST, STOP) becomes FIRST-(STOP-1)
    "passthrough": ("""
merge_method: passthrough
slices:
  - sources: [{{model: {prose}, layer_range: [0, 2]}}]
  - sources: [{{model: {code}, layer_range: [1, 3]}}]
  - sources: [{{model: {prose}, layer_range: [2, {n}]}}]
dtype: float32
""", """
model: {prose}
steps:
  - op: chain
    layers:
      - {{model: {prose}, layers: 0-1}}
      - {{model: {code}, layers: 1-2}}
      - {{model: {prose}, layers: "2-{last}"}}
"""),
}


@pytest.mark.parametrize("case", list(SAME_MODEL))
def test_a_mergekit_config_makes_the_hand_written_plans_model(demo, cli, tmp_path, case):
    config, plan = (_filled(text, {**demo, "last": demo["n"] - 1}) for text in SAME_MODEL[case])
    got = _run(cli, tmp_path, config, "from-mergekit")
    want = _run(cli, tmp_path, plan, "by-hand")
    _assert_same_model(got, want)
    record = json.loads((got / "surgery.json").read_text())
    assert record["translated_from"] == "mergekit"
    assert "The mergekit config it was made from" in (got / "README.md").read_text()


def test_out_dtype_writes_every_merged_tensor_and_the_config_in_it(demo, cli, tmp_path):
    config = _filled("""
merge_method: linear
models:
  - {{model: {prose}, parameters: {{weight: 1}}}}
  - {{model: {code}, parameters: {{weight: 1}}}}
dtype: float32
out_dtype: bfloat16
""", demo)
    out = _run(cli, tmp_path, config, "bf16")
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    config_json = json.loads((out / "config.json").read_text())
    assert "bfloat16" in {config_json.get("torch_dtype"), config_json.get("dtype")}
    assert config_json.get("torch_dtype", "bfloat16") == config_json.get("dtype", "bfloat16") == "bfloat16"


def test_paths_in_a_mergekit_config_are_read_from_where_it_runs(demo, cli, tmp_path, monkeypatch):
    """As mergekit reads them: from the current folder, not the config's."""
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    config = ("merge_method: linear\nmodels:\n  - {model: prose, parameters: {weight: 1}}\n"
              "  - {model: code, parameters: {weight: 3}}\n")
    monkeypatch.chdir(demo["prose"].parent)
    plan = write_plan(elsewhere, config, "merge.yaml")
    result = cli("apply", plan, "--out", tmp_path / "out", "--no-fsync")
    assert result.code == 0, result.err
    want = _run(cli, tmp_path, "steps:\n  - op: linear\n    models: "
                f"[{{model: {demo['prose']}, weight: 1}}, {{model: {demo['code']}, weight: 3}}]\n", "by-hand")
    _assert_same_model(tmp_path / "out", want)


def test_check_prints_the_translated_plan(demo, cli, tmp_path):
    config = write_plan(tmp_path, _filled(SAME_MODEL["slerp"][0], demo), "slerp.yaml")
    result = cli("check", config, "--out", tmp_path / "out")
    assert result.code == 0, result.err
    assert "mergekit config, translated to this surgery plan:" in result.out
    assert "op: slerp" in result.out and "- {filter: self_attn, value: [0.0, 0.5, 0.3, 0.7, 1.0]}" in result.out
    result = cli("check", config, "--out", tmp_path / "out", "--json")
    summary = json.loads(result.out)
    assert summary["translated_plan"]["steps"][0]["op"] == "slerp"
    assert summary["translated_plan"]["steps"][0]["dtype"] == "bfloat16"
    assert listing(tmp_path) == ["slerp.yaml"]


def test_what_changes_nothing_is_left_out_with_a_note(demo, cli, tmp_path):
    config = _filled("""
merge_method: ties
base_model: {base}
models:
  - {{model: {prose}, parameters: {{weight: 1, density: 0.5, select_topk: 0.3}}}}
  - {{model: {code}, parameters: {{weight: 1, density: 0.5, lambda: 2}}}}
parameters: {{int8_mask: true}}
""", demo)
    plan = write_plan(tmp_path, config, "ties.yaml")
    result = cli("check", plan, "--out", tmp_path / "out")
    assert result.code == 0, result.err
    assert "note: 'int8_mask' changes nothing in mergekit's ties (parameters.int8_mask)" in result.err
    assert "note: mergekit's ties takes no 'select_topk' (models[0].parameters.select_topk)" in result.err
    assert "note: mergekit reads 'lambda' from the slice and the config only, not one model" in result.err
    assert "lambda" not in json.loads(cli("check", plan, "--out", tmp_path / "o", "--json").out)["translated_plan"][
        "steps"][0]


def test_dare_notes_that_its_drop_is_seeded(demo):
    translation = translate({"merge_method": "dare_linear", "base_model": "b",
                             "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}]})
    assert any("seeded (seed 0" in note for note in translation.notes)


def test_precedence_a_models_unconditional_value_ends_the_search():
    """mergekit stops at the most specific level whose conditions match; an unconditional value there hides
    the levels below."""
    translation = translate({"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"weight": 2},
                             "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.1},
                                                                                  {"value": 0.2}]}},
                                        {"model": "c"}]})
    models = translation.plan["steps"][0]["models"]
    assert models == [{"model": "a", "weight": [{"filter": "mlp", "value": 0.1}, {"value": 0.2}]},
                      {"model": "c", "weight": 2}]


def test_a_config_path_or_revision_becomes_surgerys_reference():
    translation = translate({"merge_method": "linear", "models": [
        {"model": {"model": {"path": "org/a", "revision": "v2"}}, "parameters": {"weight": 1}},
        {"model": "org/b@main", "parameters": {"weight": 1}}]})
    assert [m["model"] for m in translation.plan["steps"][0]["models"]] == ["org/a@v2", "org/b@main"]


REFUSED = {
    "unknown key": ("merge_method: ties\nbase_modle: {base}\nmodels: []\n",
                    "base_modle: unknown key; did you mean 'base_model'?"),
    "typo in a parameter": ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {prose}\n"
                            "    parameters: {{weight: 1, densty: 0.5}}\n",
                            "models[0].parameters.densty: unknown mergekit parameter 'densty'; did you mean 'density'?"),
    "lora": ("merge_method: linear\nmodels:\n  - {{model: {prose}+some/lora, parameters: {{weight: 1}}}}\n",
             "names a LoRA (model+lora), which is not translated"),
    "tokenizer tokens": ("merge_method: linear\ntokenizer: {{source: union, tokens: {{x: {{source: base}}}}}}\n"
                         "models:\n  - {{model: {prose}, parameters: {{weight: 1}}}}\n",
                         "tokenizer.tokens: per-token embedding sources are not translated"),
    "passthrough tokenizer": ("merge_method: passthrough\ntokenizer_source: union\nslices:\n"
                              "  - sources: [{{model: {prose}, layer_range: [0, 2]}}]\n",
                              "passthrough's chain takes the first model's vocabulary as it is"),
    "modules": ("merge_method: linear\nmodules: {{text: {{}}}}\nmodels: [{{model: {prose}}}]\n",
                "modules: per-module configs (multimodal models) are not translated"),
    "several slices": ("merge_method: linear\nslices:\n  - sources: [{{model: {prose}, layer_range: [0, 2]}}]\n"
                       "  - sources: [{{model: {prose}, layer_range: [2, 4]}}]\n", "a merge over several slices"),
    "slice not from 0": ("merge_method: linear\nslices:\n  - sources:\n"
                         "      - {{model: {prose}, layer_range: [1, {n}], parameters: {{weight: 1}}}}\n",
                         "starts at layer 1: surgery merges whole models"),
    "part of the layers": ("merge_method: linear\nslices:\n  - sources:\n"
                           "      - {{model: {prose}, layer_range: [0, 2], parameters: {{weight: 1}}}}\n"
                           "      - {{model: {code}, layer_range: [0, 2], parameters: {{weight: 1}}}}\n",
                           "layer_range [0, 2] of"),
    "slerp of three": ("merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels:\n"
                       "  - model: {prose}\n  - model: {code}\n", "slerp merges base_model with exactly one other"),
    "ties without a base": ("merge_method: ties\nmodels:\n  - {{model: {prose}, parameters: {{weight: 1}}}}\n",
                            "merge_method ties needs a base_model"),
    "no weight": ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {prose}\n",
                  "mergekit needs 'weight' for"),
    "weight only by filter": ("merge_method: linear\nmodels:\n  - model: {prose}\n    parameters:\n"
                              "      weight: [{{filter: mlp, value: 1}}]\n",
                              "its filters leave some tensors without a value"),
    "passthrough head from another model": (
        "merge_method: passthrough\nslices:\n  - sources: [{{model: {prose}, layer_range: [0, 2]}}]\n"
        "  - sources: [{{model: {code}, layer_range: [2, {n}]}}]\n", "end with a slice of the first model"),
    "passthrough scale": ("merge_method: passthrough\nslices:\n  - sources: [{{model: {prose}, layer_range: [0, 2]}}]\n"
                          "    parameters: {{scale: 0.5}}\n", "passthrough's scale is not translated"),
    "passthrough dtype": ("merge_method: passthrough\ndtype: bfloat16\nslices:\n"
                          "  - sources: [{{model: {prose}, layer_range: [0, 2]}}]\n", "copies tensors as they are"),
    "method surgery lacks": ("merge_method: arcee_fusion\nmodels: [{{model: {prose}}}]\n",
                             "surgery has no arcee_fusion merge yet"),
    "integer dtype": ("merge_method: linear\ndtype: int8\nmodels: [{{model: {prose}, parameters: {{weight: 1}}}}]\n",
                      "dtype: 'int8': surgery writes float32, bfloat16 or float16"),
    "residual_weight": ("merge_method: linear\nslices:\n  - residual_weight: 0.5\n    sources:\n"
                        "      - {{model: {prose}, layer_range: [0, {n}], parameters: {{weight: 1}}}}\n",
                        "residual_weight: not translated"),
    "a flag by filter": ("merge_method: ties\nbase_model: {base}\nparameters:\n  normalize: [{{filter: mlp, value: "
                         "true}}]\nmodels: [{{model: {prose}, parameters: {{weight: 1}}}}]\n",
                         "a bool parameter with filters"),
    "not a number": ("merge_method: linear\nmodels: [{{model: {prose}, parameters: {{weight: heavy}}}}]\n",
                     "'heavy' is not a float"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_has_no_exact_translation_is_refused_in_one_line(demo, cli, tmp_path, case):
    text, message = REFUSED[case]
    plan = write_plan(tmp_path, _filled(text, demo), "merge.yaml")
    result = cli("apply", plan, "--out", tmp_path / "out")
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert result.err.startswith(f"error: {plan}") or f"{plan}" in result.err.splitlines()[0]
    assert listing(tmp_path) == ["merge.yaml"]


def test_a_refusal_names_the_line_of_the_key(demo, cli, tmp_path):
    plan = write_plan(tmp_path, _filled(REFUSED["typo in a parameter"][0], demo), "merge.yaml")
    assert f"{plan}:5: mergekit config: models[0].parameters.densty" in cli("apply", plan, "--out", tmp_path / "o").err


def test_a_mergekit_config_needs_an_output_folder(demo, cli, tmp_path):
    plan = write_plan(tmp_path, _filled(SAME_MODEL["linear"][0], demo), "merge.yaml")
    result = cli("apply", plan)
    assert result.code == 2 and "a mergekit config names no output folder; pass --out" in result.err
    assert listing(tmp_path) == ["merge.yaml"]


def test_translate_refuses_with_the_place_of_the_value():
    with pytest.raises(Untranslatable) as refused:
        translate({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]})
    assert refused.value.loc == ("parameters", "t") and "mergekit needs 't'" in str(refused.value)
