"""`has_system_role` and `fold_system` against real chat templates (tests/fixtures), rendered by transformers' own
Jinja renderer; which templates take a system role is read off the model cards (Gemma's raise on one)."""
from __future__ import annotations

import pathlib

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from braidinfer.chat_template import fold_system, has_system_role

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
TAKES_A_SYSTEM_ROLE = {"qwen2_5": True, "qwen3": True, "mistral_v0.3": True, "llama3.1": True, "phi4_mini": True,
                       "deepseek_r1_distill": True, "gemma2": False}


class _Templated:
    """The part of a tokenizer that `has_system_role` uses."""

    def __init__(self, template: str | None):
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize=False, **kwargs):
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            bos_token="<s>", eos_token="</s>", **kwargs)
        return rendered[0]


def _template(name: str) -> str:
    return (FIXTURES / f"{name}_chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(TAKES_A_SYSTEM_ROLE))
def test_has_system_role_matches_the_model_card(name):
    assert has_system_role(_Templated(_template(name))) is TAKES_A_SYSTEM_ROLE[name]


def test_a_template_that_refuses_a_system_role_in_its_own_words_has_none():
    refusing = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system here') }}"
                "{% endif %}{{ m.content }}{% endfor %}")
    assert not has_system_role(_Templated(refusing))
    assert has_system_role(_Templated(None))  # nothing to render: nothing is folded


def test_the_folded_conversation_renders_on_gemma_with_the_system_text_first():
    tokenizer = _Templated(_template("gemma2"))
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(fold_system(chat), add_generation_prompt=True)
    assert rendered == "<s><start_of_turn>user\nBe terse.\n\nhello<end_of_turn>\n<start_of_turn>model\n"
