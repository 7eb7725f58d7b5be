"""Chat templates: where they come from in source files, and rendering them with jinja2.

Rendering follows transformers' `apply_chat_template(..., tokenize=False)`: a sandboxed jinja2
environment with `trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `tojson`
filter that keeps non-ASCII text, and the globals `raise_exception` and `strftime_now`; the
template sees `messages`, `add_generation_prompt` and the special-token strings (`bos_token`,
`eos_token`, `pad_token`) plus any extra variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from gptk_jax.tokenizers.base import CHAT_TEMPLATE_FILE, TokenizerError

HF_TOKENIZER_CONFIG = "tokenizer_config.json"


def read_hf_chat_template(folder: Path) -> Optional[str]:
    """An HF model folder's chat template: `chat_template.jinja`, else tokenizer_config.json's
    `chat_template` (a string, or a list of {"name", "template"}: the one named "default")."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    path = folder / HF_TOKENIZER_CONFIG
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise TokenizerError(f"{path}: not a JSON object ({e})") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{path}: chat_template must be a string or a list of "
                             f"{{name, template}}, got {type(template).__name__}")
    return template


def read_chat_template_file(folder: Path) -> Optional[str]:
    """The `chat_template.jinja` in a converted tokenizer folder, or None."""
    path = Path(folder) / CHAT_TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment():
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError("rendering a chat template needs jinja2 (pip install jinja2)") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = False, **variables: Any) -> str:
    """`template` rendered for `messages`; jinja2 errors become TokenizerError."""
    env = _environment()
    import jinja2

    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from None
