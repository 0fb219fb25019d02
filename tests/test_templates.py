"""Tests for loading and validating CLIP prompt templates."""

import json
import logging

import pytest

from hf_dawin.templates import TEMPLATES_DIR, load_templates, validate_templates


def test_default_templates_load():
    templates = load_templates()

    assert 8 <= len(templates) <= 12
    assert templates == load_templates("default")
    assert len(set(templates)) == len(templates)
    for template in templates:
        assert template.count("{}") == 1, template
        assert template == template.strip()
        assert "dog" in template.format("dog")


def test_default_file_has_no_blank_lines():
    lines = (TEMPLATES_DIR / "default.txt").read_text(encoding="utf-8").splitlines()

    assert all(line.strip() for line in lines)
    assert lines == load_templates()


def test_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a photo of a {}.\n\n   \n  an image of the {}.  \n", encoding="utf-8")

    assert load_templates(path) == ["a photo of a {}.", "an image of the {}."]
    assert load_templates(str(path)) == ["a photo of a {}.", "an image of the {}."]


def test_json_list_loads(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(["itap of a {}.", "a {} in the wild."]), encoding="utf-8")

    assert load_templates(path) == ["itap of a {}.", "a {} in the wild."]


def test_non_ascii_templates_load(tmp_path):
    path = tmp_path / "fr.txt"
    path.write_text("une photo d'un {}.\n", encoding="utf-8")

    assert load_templates(path) == ["une photo d'un {}."]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a photo of a {}.\na photo.\n", r"line 2: template 'a photo.' contains 0 '\{\}' placeholders"),
        ("a photo of a {}.\n\n{} and {}\n", r"line 3: template '\{\} and \{\}' contains 2 '\{\}' placeholders"),
        ("a {0} photo of a {}.\n", r"line 1: .* contains braces other than the one '\{\}' placeholder"),
        ("a photo of a {name}.\n", r"line 1: template 'a photo of a \{name\}.' contains 0"),
        ("a {{}} photo of a {}\n", r"line 1: .* contains 2 '\{\}' placeholders"),
        ("\n  \n", "contains no templates"),
        ("", "contains no templates"),
    ],
)
def test_text_file_rejects_bad_templates(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(ValueError, match=message):
        load_templates(path)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("no placeholder\n", encoding="utf-8")

    with pytest.raises(ValueError) as error:
        load_templates(path)

    assert str(path) in str(error.value)
    assert "line 1" in str(error.value)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ({"templates": ["a {}."]}, ValueError, "must contain a JSON list of template strings, got a dict"),
        (["a {}.", 3], TypeError, r"item 1: expected a template string, got 3 of type int"),
        (["a {}.", "b"], ValueError, r"item 1: template 'b' contains 0"),
        ([], ValueError, "contains no templates"),
    ],
)
def test_json_file_rejects_bad_content(tmp_path, data, error, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")

    with pytest.raises(error, match=message):
        load_templates(path)


def test_json_file_rejects_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[\"a {}.\",", encoding="utf-8")

    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_templates(path)


def test_missing_file_lists_bundled_sets(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*bundled set name: \['default'\]"):
        load_templates(tmp_path / "absent.txt")


def test_unknown_name_rejected():
    with pytest.raises(FileNotFoundError, match="Template file 'imagenet80' does not exist"):
        load_templates("imagenet80")


def test_list_argument_rejected():
    with pytest.raises(TypeError, match="call validate_templates"):
        load_templates(["a photo of a {}."])


def test_duplicates_logged(tmp_path, caplog):
    path = tmp_path / "dup.txt"
    path.write_text("a {}.\nthe {}.\na {}.\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="hf_dawin.templates"):
        templates = load_templates(path)

    assert templates == ["a {}.", "the {}.", "a {}."]
    assert "more than once: ['a {}.']" in caplog.text


def test_validate_templates_strips():
    assert validate_templates(["  a {}. ", "the {}"]) == ["a {}.", "the {}"]


@pytest.mark.parametrize(
    ("templates", "error", "message"),
    [
        ([], ValueError, "templates: the template list is empty"),
        ("a photo of a {}.", TypeError, "expected a list of template strings, got str"),
        (["a {}.", None], TypeError, r"templates, item 1: expected a template string, got None"),
        (["a {}.", "   "], ValueError, r"templates, item 1: template '' contains 0"),
        (["{} {}"], ValueError, r"item 0: template '\{\} \{\}' contains 2"),
    ],
)
def test_validate_templates_rejects_bad_lists(templates, error, message):
    with pytest.raises(error, match=message):
        validate_templates(templates)


def test_named_pipe_is_read(tmp_path):
    import os
    import threading

    pipe = tmp_path / "templates"
    os.mkfifo(pipe)

    def write():
        with open(pipe, "w") as handle:
            handle.write("a photo of a {}.\nan image of a {}.\n")

    writer = threading.Thread(target=write)
    writer.start()
    templates = load_templates(str(pipe))
    writer.join(timeout=10)

    assert templates == ["a photo of a {}.", "an image of a {}."]
