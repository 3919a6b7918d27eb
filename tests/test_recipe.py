"""Every class of recipe error names the file and the field, at load or plan time."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import refusals, write_recipe

from qbench.cli import main
from qbench.plan import plan
from qbench.recipe import RecipeError, load_recipe

VALID = """
name: t
checkpoints:
  - {name: local, path: LLAMA}
quantizers:
  - {name: w8a8, method: rtn, weights: {bits: 8}, activations: {bits: 8}}
  - {name: w4g4, method: rtn, weights: {bits: 4, group: 4}}
  - {name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4, symmetric: false}}
eval:
  perplexity: [{data: embedded, seq_len: 64, max_windows: 2}]
"""


def _error(tmp_path: Path, text: str, llama_dir: Path | None = None) -> str:
    path = write_recipe(tmp_path / "r.yaml", text.replace("LLAMA", str(llama_dir)))
    with pytest.raises(RecipeError) as caught:
        plan(load_recipe(path), path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    return message


def test_valid_recipe_plans_fp_first_then_each_quantizer(tmp_path, llama_dir):
    path = write_recipe(tmp_path / "r.yaml", VALID.replace("LLAMA", str(llama_dir)))
    cells = plan(load_recipe(path), path)
    assert [c.quantizer_name for c in cells] == ["fp", "w8a8", "w4g4", "w4a4"]
    assert len({c.key for c in cells}) == 4


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "bits: 4, group: 4",
            "bits: 9, group: 4",
            "quantizers[1].weights.bits: must be between 2 and 8",
        ),
        (
            "bits: 4, group: 4",
            "bitz: 4",
            "quantizers[1].weights: unknown field 'bitz' (did you mean 'bits'?)",
        ),
        (
            "method: rtn, weights: {bits: 8}",
            "method: rnt, weights: {bits: 8}",
            "quantizers[0]: unknown quantization method 'rnt' (did you mean 'rtn'?)",
        ),
        (
            "name: t\n",
            "name: t\nchekpoints: []\n",
            "r.yaml: unknown field 'chekpoints' (did you mean 'checkpoints'?)",
        ),
        (
            "symmetric: false",
            "symmetric: false, clip: 1.5",
            "quantizers[2].activations.clip: must be in (0, 1]",
        ),
        (
            "bits: 4, group: 4",
            "bits: 4, granularity: group",
            "quantizers[1].weights: Value error, granularity 'group' needs a group size",
        ),
        (
            "bits: 4, group: 4",
            "bits: 4, granularity: token",
            "quantizers[1].weights.granularity: Input should be 'tensor', 'channel' or 'group'",
        ),
        ("name: w8a8", "name: fp", "r.yaml: quantizers: name 'fp' is reserved"),
        ("name: w4a4", "name: w8a8", "quantizers: duplicate name(s) ['w8a8']"),
        (
            "{name: local, path: LLAMA}",
            "{name: local}",
            "checkpoints[0]: Value error, give exactly one of hf:, path:, gguf:, train:",
        ),
        (
            "{data: embedded,",
            "{data: wikitext3,",
            "eval.perplexity[0].data: unknown text source 'wikitext3' (did you mean 'wikitext2'?)",
        ),
        (
            "{data: embedded,",
            "{data: wikitext2, split: train,",
            "eval.perplexity[0]: Value error, split 'train' is not one of wikitext2's splits",
        ),
        (
            "seq_len: 64",
            "seq_len: 1",
            "eval.perplexity[0].seq_len: Input should be greater than or equal to 2",
        ),
        (
            "{name: local, path: LLAMA}",
            "{name: local, train: {preset: tiny, variant: gated}}",
            "checkpoints[0].train.variant: unknown variant 'gated'",
        ),
        (
            "{name: local, path: LLAMA}",
            "{name: local, train: {preset: huge}}",
            "checkpoints[0].train.preset: unknown training preset 'huge'",
        ),
        ("name: t\n", "seed: 0\n", "r.yaml: name: required field is missing"),
    ],
)
def test_schema_errors_name_the_field(tmp_path, llama_dir, old, new, expected):
    assert old in VALID
    assert expected.replace("Value error, ", "") in _error(
        tmp_path, VALID.replace(old, new), llama_dir
    )


def _refusals(tmp_path, text: str, llama_dir) -> dict[str, str]:
    return refusals(write_recipe(tmp_path / "r.yaml", text.replace("LLAMA", str(llama_dir))))


def test_group_that_does_not_divide_a_layer_refuses_that_cell_naming_the_layer(tmp_path, llama_dir):
    (message,) = _refusals(tmp_path, VALID.replace("group: 4", "group: 32"), llama_dir).values()
    assert "quantizers[1] 'w4g4'.weights.group: group 32 does not divide the input width 172" in (
        message
    )
    assert "model.layers.0.mlp.down_proj" in message and "checkpoint 'local'" in message


def test_activation_group_is_checked_too(tmp_path, llama_dir):
    text = VALID.replace("symmetric: false}", "group: 64}")
    (message,) = _refusals(tmp_path, text, llama_dir).values()
    assert "activations.group: group 64 does not divide" in message


def test_window_longer_than_the_model_context(tmp_path, llama_dir):
    message = _error(tmp_path, VALID.replace("seq_len: 64", "seq_len: 512"), llama_dir)
    assert (
        "eval.perplexity[0].seq_len: 512 exceeds checkpoint 'local''s max_position_embeddings 256"
        in message
    )


def test_missing_checkpoint_directory(tmp_path):
    message = _error(tmp_path, VALID.replace("LLAMA", "no/such/dir"))
    assert "checkpoints[0].path: no such directory 'no/such/dir'" in message


def test_directory_without_config(tmp_path):
    message = _error(tmp_path, VALID.replace("LLAMA", str(tmp_path)))
    assert "checkpoints[0].path:" in message and "has no config.json" in message


def test_unreachable_hub_checkpoint_suggests_a_local_path(tmp_path):
    message = _error(tmp_path, VALID.replace("path: LLAMA", "hf: nobody/no-such-model"))
    assert "checkpoints[0].hf: cannot resolve revision 'main' of 'nobody/no-such-model'" in message
    assert "use path:" in message


def test_missing_dataset_names_where_it_looked(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path / "nodata"))
    message = _error(tmp_path, VALID.replace("{data: embedded,", "{data: wikitext2,"), llama_dir)
    assert "eval.perplexity[0].data: wikitext2 'test': no local file at" in message
    assert "nodata/wikitext-2-raw/wiki.test.raw" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "a recipe is a mapping"),
        ("name: a\nseed: 1\nname: b\n", "key 'name' appears twice"),
    ],
)
def test_unreadable_files(tmp_path, text, expected):
    path = write_recipe(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


def test_cli_reports_one_error_and_exits_nonzero(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.yaml"), "--results", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"qbench: error: {tmp_path / 'absent.yaml'}: no such recipe file"
    )


def test_an_eval_spec_validates_its_own_dump():
    """A spec without a name round-trips (the name is optional: check_name passes None)."""
    from qbench.eval.specs import PerplexitySpec

    spec = PerplexitySpec(data="embedded")
    assert PerplexitySpec.model_validate(spec.model_dump()) == spec
