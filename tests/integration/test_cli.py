"""The `braid` command line on a tiny random model: its output is the engine's output."""
from __future__ import annotations

import io
import json
import pathlib
import shutil

import pytest

from braidinfer import LLM, SamplingParams
from braidinfer.cli import main
from braidinfer.errors import InvalidRequestError, UnsupportedModelError

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", seed=3)


def test_generate_prints_the_greedy_answer(model_dir, capsys):
    with LLM(model=model_dir, device="cpu", progress=False) as llm:
        expected = llm.chat([{"role": "user", "content": "Hello there"}],
                            SamplingParams(temperature=0, max_tokens=6)).text
    assert main(["generate", "Hello there", "--model", model_dir, "--device", "cpu", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_keeps_history_and_reuses_it(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\n\n"))
    assert main(["chat", "--model", model_dir, "--device", "cpu", "--max-tokens", "5", "--stats"]) == 0
    stats = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 2
    cached_second = int(stats[1].split("(")[1].split()[0])
    assert cached_second > 0  # the second turn's prompt starts with the first turn, served from the KV cache


def test_python_dash_m_runs_the_command(model_dir):
    """`python -m braidinfer` is `braid`: the same greedy answer as the engine's, a model given as a pathlib.Path."""
    import pathlib
    import subprocess
    import sys

    with LLM(model=pathlib.Path(model_dir), device="cpu", progress=False) as llm:
        expected = llm.chat([{"role": "user", "content": "Hello there"}],
                            SamplingParams(temperature=0, max_tokens=6)).text
    done = subprocess.run([sys.executable, "-m", "braidinfer", "generate", "Hello there", "--model", model_dir,
                           "--device", "cpu", "--max-tokens", "6"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == expected + "\n"


def test_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("braid: error:") and "missing" in err and "Traceback" not in err


def test_unknown_architecture_names_the_supported_ones(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "mambaish"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(model=str(bad), device="cpu", progress=False)


def test_a_closed_output_pipe_ends_quietly(model_dir):
    """`braid generate ... | head`: the reader goes away; the command exits 141 without a traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "braidinfer", "generate", "Hello there", "--model", model_dir,
                             "--device", "cpu", "--max-tokens", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the first token: every write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 141, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_model_whose_tokenizer_cannot_load_is_one_line(model_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "broken"
    shutil.copytree(model_dir, bad)
    (bad / "tokenizer.json").write_text('{"broken')
    (bad / "tokenizer_config.json").write_text('{"broken')
    assert main(["generate", "hi", "--model", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("braid: error: the tokenizer of") and "Traceback" not in err


def test_an_unexpected_error_is_one_line_unless_a_traceback_is_asked_for(model_dir, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(LLM, "stream_deltas", broken)
    argv = ["generate", "hi", "--model", model_dir, "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err  # the load's progress bar, then the one line
    assert err.splitlines()[-1] == "braid: error: RuntimeError: boom (--traceback for details)"
    assert "Traceback" not in err
    assert main(argv + ["--traceback"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("braid: error: RuntimeError: boom\n")


def test_a_turn_that_fails_does_not_end_the_chat(model_dir, capsys, monkeypatch):
    with LLM(model=model_dir, device="cpu", progress=False) as llm:
        context = llm.engine.max_model_len
        expected = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=5)).text
    too_long = "word " * (2 * context)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{too_long}\nhello\n\n"))
    # Read from a pipe, so the exit status reports the failed turn (2), after the rest of the chat ran.
    assert main(["chat", "--model", model_dir, "--device", "cpu", "--max-tokens", "5", "--stats"]) == 2
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("braid")] == ["braid"]
    assert "context" in err
    assert out == expected + "\n"  # the second turn is answered as the first of the conversation
    assert len([line for line in err.splitlines() if line.startswith("[prompt")]) == 1


def _with_template(model_dir, path, template: str | None) -> str:
    """A copy of the model at `path` whose tokenizer has `template` as its chat template (None: no template)."""
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_model_without_a_chat_template_points_to_raw(model_dir, tmp_path, capsys, monkeypatch):
    bare = _with_template(model_dir, tmp_path / "bare", None)
    argv = ["--model", bare, "--device", "cpu", "--max-tokens", "3"]
    assert main(["generate", "hi", *argv]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "braid: error: the model's tokenizer has no chat template; use --raw to send the prompt as is")
    assert main(["generate", "hi", "--raw", *argv]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n"))
    assert main(["chat", *argv]) == 2
    assert "no chat template; braid chat needs one" in capsys.readouterr().err.splitlines()[-1]


def test_chat_folds_the_system_prompt_into_the_first_turn_for_a_template_without_a_system_role(
        model_dir, tmp_path, capsys, monkeypatch):
    gemma = _with_template(model_dir, tmp_path / "gemma", (FIXTURES / "gemma2_chat_template.jinja").read_text())
    greedy = SamplingParams(temperature=0, max_tokens=5)
    with LLM(model=gemma, device="cpu", progress=False) as llm:
        with pytest.raises(InvalidRequestError, match="System role not supported"):
            llm.apply_chat_template([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello"}])
        conversation = [{"role": "user", "content": "Be terse.\n\nhello"}]
        first = llm.chat(conversation, greedy).text
        conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
        second = llm.chat(conversation, greedy).text
    assert first and second
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n\n"))
    assert main(["chat", "--system", "Be terse.", "--model", gemma, "--device", "cpu", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out == f"{first}\n{second}\n"
