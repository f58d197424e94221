"""Chat templates, rendered as transformers renders them: a sandboxed jinja2 environment with
``trim_blocks``/``lstrip_blocks`` and loop controls, ``raise_exception``, a ``tojson`` that does not
HTML-escape, ``bos_token``/``eos_token`` from the tokenizer config, and ``add_generation_prompt``.

The template comes from the export directory: ``chat_template.jinja`` (transformers >= 4.43) or
the ``chat_template`` key of ``tokenizer_config.json`` (a string, or a list of named templates of
which ``default`` is used). Both are read through the model directory's one gate.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..external_data import confined_path, read_regular_text
from ..text import read_model_json


class ChatTemplateError(ValueError):
    """The model has no chat template, or its template failed on these messages."""


def special_token(config: dict, name: str) -> str:
    value = config.get(name)
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def load_chat_template(model_dir: str | Path) -> str | None:
    path = confined_path(model_dir, "chat_template.jinja")
    if path.is_file():
        return read_regular_text(path, max_bytes=1 << 20)
    template = read_model_json(model_dir, "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


class ChatTemplate:
    """A model's chat template, compiled once."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        try:
            self.template = environment.from_string(source)
        except Exception as error:  # jinja2's TemplateSyntaxError and friends
            raise ChatTemplateError(f"the model's chat template does not compile ({error}); fix "
                                    f"chat_template in tokenizer_config.json") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ChatTemplate | None":
        source = load_chat_template(model_dir)
        if source is None:
            return None
        config = read_model_json(model_dir, "tokenizer_config.json")
        return cls(source, special_token(config, "bos_token"), special_token(config, "eos_token"))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except Exception as error:  # an error inside the model's template is the request's problem
            raise ChatTemplateError(f"the chat template failed on these messages ({type(error).__name__}: "
                                    f"{error})") from None
