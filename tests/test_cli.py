"""nld-generate, run in-process on the bundled tiny model: streamed text, summary, errors."""

from __future__ import annotations

import io
import shutil

import pytest

from nld_jax import cli, tiny
from tests.conftest import GOLDEN_DIR

TINY = str(tiny.TINY_MODEL_DIR)
PROMPT = "<s> sort 3 9 1 4 ="
ARGS = ["--dtype", "float32", "--max-new-tokens", "16"]


class _Recorder(io.StringIO):
    """stdout that keeps each write, to see the text arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "self_spec", "self_spec_quadratic"])
def test_each_mode_streams_the_final_text(mode, capsys):
    assert cli.main([TINY, PROMPT, "--mode", mode, *ARGS]) == 0
    captured = capsys.readouterr()
    assert captured.out == "1 3 4 9\n"
    summary = captured.err.strip().splitlines()
    assert len(summary) == 1 and "tokens/forward" in summary[0] and "tokens/s" in summary[0]


def test_ar_text_arrives_token_by_token():
    out = _Recorder()
    assert cli.main([TINY, "<s> reverse 1 2 3 4 5 6 =", "--mode", "ar", *ARGS], stdout=out,
                    stderr=io.StringIO()) == 0
    assert out.getvalue() == "6 5 4 3 2 1\n"
    assert out.pieces[:-1] == ["6", " 5", " 4", " 3", " 2", " 1"]  # then the final newline


def test_stream_text_result():
    from nld_jax import load_model

    model = load_model(TINY, dtype="float32")
    out = io.StringIO()
    result = cli.stream_text(model, model.tokenizer, tiny.encode(PROMPT), out, mode="self_spec",
                             max_new_tokens=16)
    assert out.getvalue() == result.text == "1 3 4 9"
    assert result.output.tokens[0] == tiny.encode("1 3 4 9 </s>")
    assert result.tokens_per_second > 0 and 0 < result.first_seconds <= result.seconds


def test_chat_wraps_the_prompt_with_the_template(tmp_path, capsys):
    model_dir = tmp_path / "tiny_chat"
    shutil.copytree(tiny.TINY_MODEL_DIR, model_dir)
    # The tiny model knows no chat markers: this template turns a turn into its task format.
    (model_dir / "chat_template.jinja").write_text("{{ '<s> ' + messages[-1].content + ' =' }}")
    assert cli.main([str(model_dir), "reverse 1 2 3 4", "--chat", *ARGS]) == 0
    assert capsys.readouterr().out == "4 3 2 1\n"
    assert cli.main([TINY, "sort 1 2 3 4", "--chat", *ARGS]) == 2
    assert "no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["/no/such/model", PROMPT], "/no/such/model: not a directory"),
    ([str(GOLDEN_DIR / "gqa4_theta1e6"), PROMPT], "no tokenizer.json"),
    ([TINY, PROMPT, "--mode", "fast"], "argument --mode: invalid choice"),
    ([TINY, PROMPT, "--max-new-tokens", "ten"], "invalid int value"),
    ([TINY, PROMPT, "--max-new-tokens", "0"], "max_new_tokens=0 must be a positive integer"),
    ([TINY, PROMPT, "--mode", "diffusion", "--block-size", "1"], "block_size=1 must be"),
    ([TINY, PROMPT, "--threshold", "1.5", "--mode", "diffusion"], "threshold=1.5 must be"),
    ([TINY], "the following arguments are required: prompt"),
])
def test_bad_input_is_one_line_with_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("nld-generate: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""
