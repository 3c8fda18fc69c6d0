"""`smallgpt export` refuses bad input with one line and exit 2, leaving nothing written, and never
replaces an earlier export unless told (--overwrite), in either format."""

import pytest

from smallgpt import cli
from smallgpt.data.tokenizers import CharTokenizer
from smallgpt.model.gpt import ModelConfig

TINY = dict(block_size=8, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture
def run(tmp_path, make_run):
    tokenizer = CharTokenizer("ab \n")
    make_run(tmp_path / "run", ModelConfig(vocab_size=tokenizer.vocab_size, **TINY), tokenizer)
    return tmp_path / "run"


def export(run, out, *options):
    return cli.main(["export", "--run", str(run), "--out", str(out), *options])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--format", "gguf", "--dtype", "q4_0"], "--dtype must be one of f32, f16, q8_0, got 'q4_0'"),
        (["--format", "ggfu"], "(did you mean gguf?)"),
        (["--format", "hf", "--dtype", "f16"], "--dtype f16 is for --format gguf"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(run, tmp_path, capsys, options, named):
    assert export(run, tmp_path / "m.gguf", *options) == 2
    assert named in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope")
TARGETS = {  # format -> architecture -> how the refusal names it
    "gguf": {"gpt2": "llama.cpp's gpt2", "llama": "llama.cpp's llama"},
    "hf": {"gpt2": "transformers' GPT2LMHeadModel", "llama": "transformers' LlamaForCausalLM"},
}


@pytest.mark.parametrize(
    ("options", "arch", "named"),
    [
        ({**LLAMA, "qk_norm": True}, "llama", "qk_norm=True with pos_emb=rope: {} needs qk_norm=False"),
        (
            {"logit_softcap": 30.0},
            "gpt2",
            "logit_softcap=30.0 with pos_emb=learned: {} needs logit_softcap=0.0",
        ),
        ({"mlp": "relu2"}, "gpt2", "mlp='relu2' with pos_emb=learned: {} needs mlp='gelu'"),
    ],
)
@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_an_option_llama_cpp_lacks_is_named(tmp_path, make_run, capsys, fmt, options, arch, named):
    make_run(tmp_path / "run", ModelConfig(vocab_size=4, **TINY, **options), CharTokenizer("ab"))
    assert export(tmp_path / "run", tmp_path / "out", "--format", fmt) == 2
    assert f"cannot export {named.format(TARGETS[fmt][arch])}" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial file or temp file


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_out_in_a_missing_folder_is_refused(run, tmp_path, capsys, fmt):
    assert export(run, tmp_path / "nowhere" / "out", "--format", fmt) == 2
    assert f"folder {tmp_path / 'nowhere'} does not exist" in one_line_error(capsys)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_an_existing_export_is_replaced_only_with_overwrite(run, tmp_path, capsys, folder_hashes, fmt):
    out = tmp_path / "out"
    assert export(run, out, "--format", fmt) == 0
    before = folder_hashes(tmp_path)
    assert export(run, out, "--format", fmt, *(["--dtype", "f16"] if fmt == "gguf" else [])) == 2
    assert "already holds an export: pass --overwrite" in one_line_error(capsys)
    assert folder_hashes(tmp_path) == before
    assert (
        export(run, out, "--format", fmt, "--overwrite", *(["--dtype", "f16"] if fmt == "gguf" else [])) == 0
    )
    assert (folder_hashes(tmp_path) != before) == (fmt == "gguf")  # f16 is a new file; hf rewrites the same
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


@pytest.mark.parametrize(("fmt", "named"), [("gguf", "it is a folder"), ("hf", "is not a folder")])
def test_out_of_the_other_kind_is_refused_even_with_overwrite(run, tmp_path, capsys, fmt, named):
    out = tmp_path / "out"
    out.mkdir() if fmt == "gguf" else out.write_text("notes")
    assert export(run, out, "--format", fmt, "--overwrite") == 2
    assert named in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
