"""Prompt templates that turn class names into CLIP text prompts for zero-shot heads.

A template is a string with exactly one `{}` placeholder for the class name, e.g.
`"a photo of a {}."`. The package ships a short default set written for this project. To use
another set, such as the 80 ImageNet templates of the CLIP release, users point to their own file
with one template per line or a JSON list of strings.
"""

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATES_NAME = "default"
PLACEHOLDER = "{}"
# Used when the bundled template files are absent, for example in a remote-code copy of the package modules.
FALLBACK_TEMPLATE = "a photo of a {}."


def _bundled_names() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.txt"))


def _check_template(template: object, where: str) -> str:
    """Return the stripped template, or raise naming `where` (file and line or item)."""
    if not isinstance(template, str):
        raise TypeError(f"{where}: expected a template string, got {template!r} of type {type(template).__name__}.")
    stripped = template.strip()
    count = stripped.count(PLACEHOLDER)
    if count != 1:
        raise ValueError(
            f"{where}: template {stripped!r} contains {count} '{{}}' placeholders, but it needs exactly one, "
            "where the class name goes."
        )
    # Any other brace would make `str.format` fail or consume the class name elsewhere.
    remainder = stripped.replace(PLACEHOLDER, "", 1)
    if "{" in remainder or "}" in remainder:
        raise ValueError(
            f"{where}: template {stripped!r} contains braces other than the one '{{}}' placeholder. "
            "Remove them, because escaped braces ('{{' or '}}') are not supported."
        )
    return stripped


def validate_templates(templates: Sequence[str], source: str = "templates") -> list[str]:
    """Check a list of prompt templates and return them with surrounding whitespace removed.

    Args:
        templates: Template strings, each with exactly one `{}` placeholder.
        source: Name used in error messages, e.g. a file path.

    Returns:
        The stripped templates, in order.

    Raises:
        TypeError: If `templates` is not a sequence of strings.
        ValueError: If the list is empty, or a template is blank or has no, several or stray braces.
            The message names the item (0-based).
    """
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Sequence):
        raise TypeError(f"{source}: expected a list of template strings, got {type(templates).__name__}.")
    if len(templates) == 0:
        raise ValueError(f"{source}: the template list is empty. Give at least one template such as 'a photo of a {{}}.'.")
    checked = [_check_template(template, f"{source}, item {index}") for index, template in enumerate(templates)]
    _warn_duplicates(checked, source)
    return checked


def _warn_duplicates(templates: list[str], source: str) -> None:
    duplicates = sorted(template for template, count in Counter(templates).items() if count > 1)
    if duplicates:
        # A repeated template weighs twice in the averaged class embedding.
        logger.warning("%s lists these templates more than once: %s.", source, duplicates)


def _read_text_templates(path: Path) -> list[str]:
    templates = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        templates.append(_check_template(line, f"{path}, line {line_number}"))
    return templates


def _read_json_templates(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must contain a JSON list of template strings, got a {type(data).__name__}.")
    return [_check_template(template, f"{path}, item {index}") for index, template in enumerate(data)]


def load_templates(path_or_name: str | Path | None = None) -> list[str]:
    """Load prompt templates from a bundled set or a user file.

    Args:
        path_or_name: `None` or `"default"` for the bundled default set, the name of another bundled
            set, or the path of a user file. A `.json` file contains a list of strings. Any other file
            contains one template per line, and blank lines are skipped.

    Returns:
        The templates, each with exactly one `{}` placeholder and no surrounding whitespace.

    Raises:
        FileNotFoundError: If the path does not exist and is not a bundled name.
        ValueError: If the file is empty or a template is invalid. The message names the file and
            the line (text files, 1-based) or item (JSON, 0-based).

    Example:
        ```python
        >>> templates = load_templates()
        >>> templates[0].format("dog")
        'a photo of a dog.'
        ```
    """
    if path_or_name is None:
        path_or_name = DEFAULT_TEMPLATES_NAME
    if not isinstance(path_or_name, (str, Path)):
        raise TypeError(
            f"path_or_name must be a template set name, a path or None, got {type(path_or_name).__name__}. "
            "To use a list of templates directly, call validate_templates."
        )

    path = Path(path_or_name)
    if isinstance(path_or_name, str) and path_or_name in _bundled_names() and not path.exists():
        path = TEMPLATES_DIR / f"{path_or_name}.txt"
    if path_or_name == DEFAULT_TEMPLATES_NAME and not path.exists() and not TEMPLATES_DIR.is_dir():
        # The package data is absent when the module runs as remote code copied beside a saved model.
        logger.warning(
            "The bundled template set %r is not available (%s is missing), so the single template %r is used. "
            "Pass templates explicitly to build zero-shot heads with a fuller set.",
            DEFAULT_TEMPLATES_NAME,
            TEMPLATES_DIR,
            FALLBACK_TEMPLATE,
        )
        return [FALLBACK_TEMPLATE]
    # A pipe such as bash's `<(...)` exists without being a regular file, and reads like one.
    if not path.exists() or path.is_dir():
        raise FileNotFoundError(
            f"Template file {str(path_or_name)!r} does not exist. Pass the path of a text file (one template "
            f"per line) or a JSON list, or a bundled set name: {_bundled_names()}."
        )

    templates = _read_json_templates(path) if path.suffix.lower() == ".json" else _read_text_templates(path)
    if not templates:
        raise ValueError(f"{path} contains no templates. Add at least one line such as 'a photo of a {{}}.'.")
    _warn_duplicates(templates, str(path))
    return templates


__all__ = ["DEFAULT_TEMPLATES_NAME", "PLACEHOLDER", "TEMPLATES_DIR", "load_templates", "validate_templates"]
