"""nld-generate, run in-process on the bundled tiny model: streamed text, summary, errors."""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from nld_jax import cli, tiny
from tests.conftest import GOLDEN_DIR

ROOT = pathlib.Path(__file__).resolve().parents[1]
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


def test_chat_works_out_of_the_box(tmp_path, capsys):
    # The bundled template turns the last user turn into the tiny model's task format.
    assert cli.main([TINY, "reverse 1 2 3 4", "--chat", *ARGS]) == 0
    assert capsys.readouterr().out == "4 3 2 1\n"
    model_dir = tmp_path / "no_template"
    shutil.copytree(tiny.TINY_MODEL_DIR, model_dir)
    (model_dir / "chat_template.jinja").unlink()
    assert cli.main([str(model_dir), "sort 1 2 3 4", "--chat", *ARGS]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_sampling_options_reach_generate(monkeypatch, capsys):
    seen = {}
    real_generate = cli.nld_jax.generate

    def generate(*args, **kwargs):
        seen.update(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(cli.nld_jax, "generate", generate)
    assert cli.main([TINY, PROMPT, "--temperature", "0.7", "--top-k", "3", "--top-p", "0.9",
                     "--accept-rule", "match", "--seed", "5", *ARGS]) == 0
    assert {k: seen[k] for k in ("temperature", "top_k", "top_p", "accept_rule", "seed")} == \
        dict(temperature=0.7, top_k=3, top_p=0.9, accept_rule="match", seed=5)
    assert capsys.readouterr().out.strip()  # the model still answers


# nld-generate whose stream callback is slowed down, so that Ctrl-C lands mid-generation (while
# the compiled program runs, where Python alone would not see it until the end).
_SLOW_STREAM = """
import sys, time
from nld_jax import cli

real_call = cli._TextPrinter.__call__
def slow_call(self, new_tokens):
    real_call(self, new_tokens)
    time.sleep(0.5)
cli._TextPrinter.__call__ = slow_call
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_while_streaming_is_one_line_and_status_130():
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_STREAM, TINY, "<s> reverse 1 2 3 4 5 6 7 8 9 =", "--mode",
         "ar", *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        # A shell's background job starts with SIGINT ignored, which Python then keeps.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stdout.read(1)  # the first token's text: the loop is running
    start = time.perf_counter()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    text = (first + out).decode()
    assert time.perf_counter() - start < 2.0, "the generation ran on after Ctrl-C"
    assert process.returncode == 130 and err.decode() == "nld-generate: interrupted\n", err
    assert text.startswith("9") and text.endswith("\n") and len(text.split()) < 9, text


@pytest.mark.parametrize("argv, message", [
    (["/no/such/model", PROMPT], "/no/such/model: not a directory"),
    ([str(GOLDEN_DIR / "gqa4_theta1e6"), PROMPT], "no tokenizer.json"),
    ([TINY, PROMPT, "--mode", "fast"], "argument --mode: invalid choice"),
    ([TINY, PROMPT, "--max-new-tokens", "ten"], "invalid int value"),
    ([TINY, PROMPT, "--max-new-tokens", "0"], "max_new_tokens=0 must be a positive integer"),
    ([TINY, PROMPT, "--mode", "diffusion", "--block-size", "1"], "block_size=1 must be"),
    ([TINY, PROMPT, "--threshold", "1.5", "--mode", "diffusion"], "threshold=1.5 must be"),
    ([TINY], "the following arguments are required: prompt"),
    ([TINY, "<s> sort 12 3 ="], "'12' (at character 9) is not in the vocabulary"),
    ([TINY, PROMPT, "--accept-rule", "maybe"], "argument --accept-rule: invalid choice"),
    ([TINY, PROMPT, "--top-p", "nan"], "top_p"),
    ([TINY, PROMPT, "--compile-cache", "x", "--no-compile-cache"], "not allowed with"),
])
def test_bad_input_is_one_line_with_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("nld-generate: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""


_COUNT_CACHE_HITS = """
import sys, jax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else None)
from nld_jax import cli
status = cli.main(sys.argv[1:])
print("cache hits:", len(hits), file=sys.stderr)
sys.exit(status)
"""


def _run_counting_cache_hits(argv: list[str], env: dict[str, str]) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", _COUNT_CACHE_HITS, TINY, PROMPT, *ARGS, *argv],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    return done.stdout, int(done.stderr.rsplit("cache hits:", 1)[1])


def test_compiled_programs_are_cached_for_the_next_run(tmp_path):
    """By default the programs go to ~/.cache/nld_jax/xla ($XDG_CACHE_HOME here) and a second
    run reads them back instead of compiling; --compile-cache DIR and --no-compile-cache."""
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    # Keep every program, however fast it compiled (jax's default keeps those over 1 s).
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    default = tmp_path / "xdg" / "nld_jax" / "xla"
    text, hits = _run_counting_cache_hits([], env)
    assert hits == 0 and any(default.iterdir())
    entries = sorted(default.iterdir())
    again, hits = _run_counting_cache_hits([], env)
    assert again == text and hits > 0
    assert sorted(default.iterdir()) == entries  # nothing compiled anew
    _, hits = _run_counting_cache_hits(["--no-compile-cache"], env)
    assert hits == 0
    chosen = tmp_path / "chosen"
    _, hits = _run_counting_cache_hits(["--compile-cache", str(chosen)], env)
    assert hits == 0 and any(chosen.iterdir())
    _, hits = _run_counting_cache_hits([], {**env, "JAX_COMPILATION_CACHE_DIR": ""})
    assert hits == 0 and sorted(default.iterdir()) == entries
