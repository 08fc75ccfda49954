"""Account templates: sandboxed Jinja2, failures as InvalidInput naming template and line."""

from __future__ import annotations

import pytest

from postlane.errors import InvalidInput
from postlane.options.model import SendOptions
from postlane.render import templates
from postlane.render.templates import check_template, render_template


def test_renders_variables() -> None:
    source = "Hello {{ name }}, you have {{ items|length }} items."
    assert render_template(source, {"name": "Ann", "items": [1, 2]}) == (
        "Hello Ann, you have 2 items."
    )


def test_html_templates_escape_values() -> None:
    assert render_template("<p>{{ v }}</p>", {"v": "<b>Tom & Jerry</b>"}) == (
        "<p>&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;</p>"
    )


def test_text_templates_do_not_escape() -> None:
    assert render_template("{{ v }}", {"v": "Tom & Jerry"}, html=False) == "Tom & Jerry"


def test_missing_variables_render_empty_even_along_a_path() -> None:
    source = "[{{ missing }}|{{ user.name }}|{{ user.address.city }}|{% if nope %}x{% endif %}]"
    assert render_template(source, {}) == "[|||]"


def test_variables_from_send_options_work() -> None:
    options = SendOptions(template_variables={"user": {"name": "Ann", "tags": ["a", "b"]}})
    source = "{{ user.name }} {{ user['name'] }} {{ user.tags|join(',') }}"
    assert render_template(source, options.template_variables) == "Ann Ann a,b"


def test_the_same_template_renders_each_recipient_on_its_own_values() -> None:
    source = "Hi {{ name }}"
    assert render_template(source, {"name": "Ann"}) == "Hi Ann"
    assert render_template(source, {"name": "Bob"}) == "Hi Bob"


def test_syntax_error_names_template_and_line() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'welcome': line 3: "):
        render_template("one\ntwo\n{% for %}", {}, name="welcome")


def test_check_refuses_a_syntax_error_with_its_line() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'news/1': line 2: .*'endif'"):
        check_template("news/1", "<p>\n{% if x %}</p>", html=True)
    with pytest.raises(InvalidInput, match=r"^template 'news/1' \(subject\): line 1: "):
        check_template("news/1", "{{ name ", html=False, part="subject")


def test_render_errors_name_the_part() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'welcome' \(text\): line 2: division by"):
        render_template("one\n{{ 1 / 0 }}", {}, name="welcome", html=False, part="text")


def test_check_accepts_what_only_fails_at_render_time() -> None:
    check_template("welcome", "{{ 1 / 0 }} {{ missing.call() }}", html=True)
    with pytest.raises(InvalidInput, match="division by zero"):
        render_template("{{ 1 / 0 }}", {}, name="welcome")


def test_runtime_error_names_template_and_line() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'welcome': line 2: division by zero$"):
        render_template("one\n{{ 1 / 0 }}", {}, name="welcome")


def test_type_errors_in_templates_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'template': line 1: "):
        render_template("{{ n + 'x' }}", {"n": 1})


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ user.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ lipsum.__globals__['os'] }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ user.items.__self__ }}",
    ],
)
def test_sandbox_escapes_are_refused_not_rendered(source: str) -> None:
    with pytest.raises(InvalidInput, match=r"not allowed|unsafe"):
        render_template(source, {"user": {"name": "Ann"}})


def test_variables_cannot_be_changed_in_place() -> None:
    items: list[int] = []
    with pytest.raises(InvalidInput, match=r"template 't': line 1: .*'append'"):
        render_template("{{ items.append(1) }}", {"items": items}, name="t")
    assert items == []


def test_namespace_assignment_still_works() -> None:
    source = (
        "{% set ns = namespace(n=0) %}"
        "{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}{% endfor %}"
        "{{ ns.n }}"
    )
    assert render_template(source, {}) == "6"


def test_huge_repetition_is_refused() -> None:
    with pytest.raises(InvalidInput, match="too large"):
        render_template("{{ 'x' * 1000000000 }}", {})


def test_huge_power_is_refused() -> None:
    with pytest.raises(InvalidInput, match="too large"):
        render_template("{{ 10 ** 100000000 }}", {})


def test_small_repetition_and_power_work() -> None:
    assert render_template("{{ 'ab' * 3 }} {{ 3 * 'c' }} {{ 2 ** 10 }}", {}) == "ababab ccc 1024"


def test_huge_range_is_refused() -> None:
    with pytest.raises(InvalidInput, match="Range too big"):
        render_template("{% for i in range(10**9) %}{% endfor %}", {})


def test_runaway_output_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(templates, "MAX_OUTPUT_CHARS", 1000)
    source = "{% for i in range(100000) %}0123456789{% endfor %}"
    with pytest.raises(InvalidInput, match="output is longer than 1000 characters"):
        render_template(source, {}, name="loop")


def test_endless_recursion_is_invalid_input() -> None:
    source = "{% macro again() %}{{ again() }}{% endmacro %}{{ again() }}"
    with pytest.raises(InvalidInput, match=r"^template 'deep': "):
        render_template(source, {}, name="deep")


_SILENT_LOOPS = {
    "nested loops": (
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    ),
    "loops over a list": (
        "{% set l = range(99999)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}"
    ),
    "a macro calling itself twice": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
}


@pytest.mark.parametrize("source", _SILENT_LOOPS.values(), ids=_SILENT_LOOPS.keys())
def test_work_that_writes_nothing_is_stopped(source: str) -> None:
    # No output, so the output limit never fired: each ran for hours and held
    # a delivery thread (and its recipient) all that time.
    with pytest.raises(InvalidInput, match=r"more than 200000 loop iterations and calls$"):
        render_template(source, {}, name="spin")


def test_the_step_budget_is_per_render(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(templates, "MAX_STEPS", 50)
    source = "{% for i in items %}{{ i }}{% endfor %}"
    for _ in range(3):  # each render starts afresh
        assert render_template(source, {"items": list(range(40))}, html=False).endswith("39")
    with pytest.raises(InvalidInput, match="more than 50 loop iterations"):
        render_template(source, {"items": list(range(60))})


def test_counted_loops_keep_their_features() -> None:
    source = (
        "{% for x in items if x > 1 %}{{ x }}{% endfor %}|"
        "{% for x in missing %}x{% else %}empty{% endfor %}|"
        "{% for i in range(3) %}{{ loop.index }}/{{ loop.length }} {% endfor %}|"
        "{% for n in tree recursive %}{{ n.name }}({{ loop(n.children) }}){% endfor %}"
    )
    tree = [{"name": "a", "children": [{"name": "b", "children": []}]}]
    assert render_template(source, {"items": [1, 2, 3], "tree": tree}, html=False) == (
        "23|empty|1/3 2/3 3/3 |a(b())"
    )
