"""Account templates: sandboxed Jinja2, failures as InvalidInput naming template and line."""

from __future__ import annotations

import tracemalloc

import pytest

from postlane.errors import InvalidInput
from postlane.options.model import SendOptions
from postlane.render import template_sandbox, templates
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
    monkeypatch.setattr(template_sandbox, "MAX_STEPS", 50)
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


# --- size and cost limits -------------------------------------------------------
#
# Each case below once built hundreds of megabytes or ran for seconds to hours
# inside one render; now each fails with a template error before building
# anything big. tracemalloc's peak shows nothing big was built.

_FEW_MB = 5_000_000  # bytes
# Values up to the output limit (10 M characters) may be built; the refused
# ones were 100 MB to several GB.
_SMALL = 32_000_000
_DEEP_LIST = "{% set a = [1, 2, 3, 4, 5, 6, 7, 8] %}" + "{% set a = [a, a, a, a] %}" * 40


def _refused(
    source: str, match: str, variables: dict[str, object] | None = None, peak_limit: int = _SMALL
) -> None:
    """Render ``source``, expecting InvalidInput matching ``match`` and a small peak."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match=match):
            render_template(source, variables or {}, name="t", html=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < peak_limit


_WIDTH = r"over the limit of 1000$"
_LONG = r"the result would be longer than 10000000 characters$"
_BUDGET = r"more than 200000 loop iterations and calls$"
_REPEATS = r"a value is too large to use"

_REFUSED = {
    # The review's cases.
    "center": (
        '{{ ("x"|center(400000000))|length }}',
        r"center: a width of 400000000 is " + _WIDTH,
    ),
    "percent": ('{{ ("%400000000s" % "x")|length }}', r"format: a width or precision of 400000000"),
    "str.format": ('{{ "{:>400000000}".format("x")|length }}', r"format: a width or prec"),
    "indent": ('{{ ("a\nb"|indent(400000000))|length }}', r"^template 't': line 2: indent: a w"),
    "lipsum": ("{{ lipsum(n=300000, html=False)|length }}", _BUDGET),
    # Other ways to make a width or precision do the work.
    "percent *": ('{{ "%*s" % (400000000, "x") }}', _WIDTH),
    "percent precision": ('{{ "%.400000000f" % 1.0 }}', _WIDTH),
    "percent nested key": ('{{ "%(a(b))400000000s" % {"a(b)": "x"} }}', _WIDTH),
    "format filter": ('{{ "%400000000s"|format("x") }}', _WIDTH),
    "nested format spec": ('{{ "{:>{}}".format("x", 400000000) }}', _WIDTH),
    "format_map": ('{{ "{x:>400000000}".format_map({"x": 1}) }}', _WIDTH),
    "many format fields": ('{{ ("{:>1000}" * 20000).format(*range(20000)) }}', _LONG),
    "indent string": ('{% set s = "x" * 100000 %}{{ ("a\n" * 100000)|indent(s) }}', _LONG),
    "str.center": ('{{ "x".center(10**9) }}', r"center\(\): a width of 1000000000 is " + _WIDTH),
    "str.ljust": ('{{ "x".ljust(10**9) }}', _WIDTH),
    "str.zfill": ('{{ "1".zfill(10**9) }}', _WIDTH),
    "tojson indent": ("{{ [1]|tojson(10**9) }}", _WIDTH),
    # Arguments that are repeated in the result.
    "replace": ('{{ ("x" * 100000)|replace("x", "y" * 10000) }}', r"replace: " + _LONG),
    "replace empty": ('{{ ("x" * 100000)|replace("", "y" * 1000) }}', _LONG),
    "str.replace": ('{{ ("x" * 100000).replace("x", "y" * 10000) }}', _LONG),
    "join": ('{{ range(100000)|join("x" * 10000) }}', r"join: " + _LONG),
    "str.join": ('{{ ("x" * 100000).join(["a", "b"] * 1000) }}', _LONG),
    "wordwrap": ('{{ ("x" * 20000)|wordwrap(1, wrapstring="-" * 1000) }}', r"wordwrap: " + _LONG),
    "urlize target": ('{{ ("a.co " * 10000)|urlize(target="x" * 100000) }}', _LONG),
    "expandtabs": ('{{ ("\t" * 100000).expandtabs(1000) }}', _LONG),
    "translate": ('{{ ("a" * 100000).translate({97: "x" * 100000}) }}', _LONG),
    "to_bytes": ('{{ (1).to_bytes(10**9, "big") }}', _LONG),
    "tojson deep": (
        "{% set a = [1] * 1000 %}" + "{% set a = [a] %}" * 500 + "{{ a|tojson(1000) }}",
        _LONG,
    ),
    "slice count": ("{{ []|slice(10**8)|list }}", _BUDGET),
    "batch fill": ("{{ [1]|batch(10**9, 0)|list }}", _BUDGET),
    "lipsum words": ("{{ lipsum(n=1, max=10**9) }}", _BUDGET),
    # Doubling, and a list repeating itself, printed, compared or hashed.
    "doubling ~": ('{% set a = "x" * 5000000 %}' + "{% set a = a ~ a %}" * 4, _BUDGET),
    "doubling +": ('{% set a = "x" * 5000000 %}' + "{% set a = a + a %}" * 4, r"\+: " + _LONG),
    "squaring": (
        "{% set a = 10**20000 %}" + "{% set a = a * a %}" * 4,
        r"product would be too large",
    ),
    "repeated list": ("{{ [0] * 10000000 }}", _BUDGET),
    "print a repeating list": (_DEEP_LIST + "{{ a }}", _REPEATS),
    "string of it": (_DEEP_LIST + "{{ a|string }}", _REPEATS),
    "json of it": (_DEEP_LIST + "{{ a|tojson }}", _REPEATS),
    "it with ~": (_DEEP_LIST + "{{ a ~ '' }}", _REPEATS),
    "it with %": (_DEEP_LIST + "{{ '%s' % [a] }}", _REPEATS),
    "it in format": (_DEEP_LIST + "{{ '{}'.format(a) }}", _REPEATS),
    "it compared": (_DEEP_LIST + "{{ a == [a] }}", _REPEATS),
    "it hashed": ("{% set a = (1, 2) %}" + "{% set a = (a, a) %}" * 60 + "{{ {a: 1} }}", _REPEATS),
    "it in varargs": (
        "{% macro f() %}{{ varargs }}{% endmacro %}" + _DEEP_LIST + "{{ f(a) }}",
        _REPEATS,
    ),
    "namespaces": (
        "{% set n0 = namespace(v=[1]) %}"
        + "".join(f"{{% set n{i} = namespace(a=n{i - 1}, b=n{i - 1}) %}}" for i in range(1, 40))
        + "{{ n39 }}",
        _BUDGET + "|" + _REPEATS,
    ),
    # Text built out of reach of the output limit: a {% set %} block's buffer.
    "set block": (
        '{% set s = "x" * 1000000 %}{% set x %}{% for i in range(10000) %}{{ s }}{% endfor %}'
        "{% endset %}{{ x|length }}",
        _BUDGET,
    ),
    "literal text in a loop": (
        "{% set x %}{% for i in range(100000) %}" + "y" * 100000 + "{% endfor %}{% endset %}",
        _BUDGET,
    ),
}


@pytest.mark.parametrize(("source", "match"), _REFUSED.values(), ids=_REFUSED.keys())
def test_values_too_big_to_build_are_refused_before_they_are_built(source: str, match: str) -> None:
    _refused(source, match)


def test_the_reviewed_loop_stops_at_its_first_oversized_step() -> None:
    source = '{% for i in range(200) %}{{ ("x"|center(100000000 + i))|length > 0 }}{% endfor %}'
    _refused(
        source, r"^template 't': line 1: center: a width of 100000000 is " + _WIDTH, None, _FEW_MB
    )


_COSTLY_STEPS = {
    "long loop body": "{% for j in range(100000) %}" + "{% if j == 3 %}{% endif %}" * 200,
    "filters in a loop": "{% for j in range(100000) %}" + "{{ 'ab'|upper|lower|trim }}" * 20,
    "method calls": "{% for j in range(100000) %}" + "{{ 'ab'.upper() }}" * 20,
    "attributes": "{% for j in range(100000) %}" + "{{ user.a.b.c.d }}" * 20,
    "format fields": "{% for j in range(100000) %}{{ ('{0.real}' * 1000).format(1)|length }}",
    "filter per item": "{% for j in range(100000) %}{{ range(1000)|map('string')|list }}",
    "sort": "{% set l = range(1000)|list %}{% for j in range(100000) %}{{ l|sort|length }}",
    "pprint": "{% set l = range(1000)|list %}{% for j in range(100000) %}{{ l|pprint|length }}",
    "in a list": "{% set l = range(1000)|list %}{% for j in range(100000) %}{{ -1 in l }}",
    "urlize": "{% for j in range(100000) %}{{ text|urlize|length }}",
    "slice copies": "{% for j in range(100000) %}{{ text[1:]|length }}",
    "loop test": "{% for i in range(100000) %}{% for j in range(100000) if false %}{% endfor %}",
    "recursive loop": (
        "{% for n in range(1000) recursive %}{% if loop.depth < 3 %}{{ loop(range(1000)) }}"
        "{% endif %}"
    ),
    "macro arguments": (
        "{% set l = range(100000)|list %}{% macro f() %}{% endmacro %}"
        "{% for j in range(100000) %}{{ f(*l) }}"
    ),
}


@pytest.mark.parametrize("source", _COSTLY_STEPS.values(), ids=_COSTLY_STEPS.keys())
def test_every_kind_of_step_is_bounded(source: str) -> None:
    # Each spends the budget in a different way; together they are how
    # MAX_STEPS was measured (its docstring says how long each took).
    text = "word www.example.com a@b.co <b>x</b> & text\n" * 250
    user = {"a": {"b": {"c": {"d": 1}}}}
    with pytest.raises(InvalidInput, match=_BUDGET):
        render_template(source + "{% endfor %}", {"text": text, "user": user}, html=False)


@pytest.mark.parametrize(
    "source",
    [
        '{{ "x"|center(10**9) }}',
        '{% set x = "x"|center(10**9) %}{{ x }}',
        '{% if "x"|center(10**9) %}{% endif %}',
        '{{ ("x"|center(10**9))|length }}{{ "y"|center(10**9) }}',
        '{{ "%999999999s" % "x" }}{{ "{:>999999999}".format("x") }}',
        '{{ "x" ~ "y"|center(10**9) }}',
        '{% if "x"|center(10**9) is string %}{% endif %}',
    ],
)
def test_compiling_runs_nothing_of_the_template(source: str) -> None:
    # Jinja's optimizer used to call constant filters when the template was
    # stored, taking seconds and a gigabyte, and kept the result cached.
    tracemalloc.start()
    try:
        check_template("big", source, html=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < _FEW_MB
    with pytest.raises(InvalidInput, match=_WIDTH):
        render_template(source, {}, name="big", html=False)


def test_too_deep_nesting_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'deep': the template is nested too deeply$"):
        check_template("deep", "{{" + "(" * 5000 + "1" + ")" * 5000 + "}}", html=False)


_NORMAL = {
    "center": ("[{{ 'ab'|center(6) }}]{{ name|center(5) }}|", "[  ab  ] Ann |"),
    "center method": (
        "[{{ 'ab'.center(6, '*') }}|{{ 'x'.ljust(3) }}|{{ '7'.zfill(3) }}]",
        "[**ab**|x  |007]",
    ),
    "indent": (
        "{{ 'a\nb\n\nc'|indent(2) }}|{{ 'a\nb'|indent('> ', first=true) }}",
        "a\n  b\n\n  c|> a\n> b",
    ),
    "format filter": (
        "{{ '%s has %d'|format(name, 3) }}|{{ '%(n)s'|format(n=name) }}",
        "Ann has 3|Ann",
    ),
    "percent": (
        "{{ '%-5s|%5.2f|%05d|%x|%%' % ('ab', 3.14159, 42, 255) }}",
        "ab   | 3.14|00042|ff|%",
    ),
    "percent mapping": ("{{ '%(a)s-%(b)03d' % {'a': name, 'b': 7} }}", "Ann-007"),
    "str.format": (
        "{{ '{} {:>5} {:.2f} {:,} {n}'.format(name, 'r', 2.5, 1234, n=1) }}",
        "Ann     r 2.50 1,234 1",
    ),
    "format_map": ("{{ '{a}/{b[0]}'.format_map({'a': name, 'b': [1]}) }}", "Ann/1"),
    "wordwrap": ("{{ 'aaa bbb ccc\nddd'|wordwrap(7, wrapstring='|') }}", "aaa bbb|ccc|ddd"),
    "replace": ("{{ 'aaa'|replace('a', 'bb', 2) }} {{ 'x-y'.replace('-', '+') }}", "bbbba x+y"),
    "join": ("{{ [1, 2, 3]|join('|') }} {{ '-'.join(['a', 'b']) }}", "1|2|3 a-b"),
    "concat": ("{{ name ~ '/' ~ 3 ~ [1] }}", "Ann/3[1]"),
    "truncate": ("{{ 'hello world'|truncate(9, leeway=0) }}", "hello..."),
    "sum": ("{{ [1, 2, 3]|sum }} {{ [[1], [2, 3]]|sum(start=[]) }}", "6 [1, 2, 3]"),
    "batch and slice": (
        "{{ range(5)|batch(2, 0)|list }} {{ range(5)|slice(2)|list }}",
        "[[0, 1], [2, 3], [4, 0]] [[0, 1, 2], [3, 4]]",
    ),
    "tojson and pprint": (
        "{{ {'a': [1]}|tojson(1) }} {{ {'a': [1]}|pprint }}",
        "{\n \"a\": [\n  1\n ]\n} {'a': [1]}",
    ),
    "slices": (
        "{{ 'abcdef'[1:4] }} {{ [1, 2, 3][::-1] }} {{ range(10)[2:4]|list }}",
        "bcd [3, 2, 1] [2, 3]",
    ),
    "comparisons": (
        "{{ 2 in [1, 2] }} {{ 'a' in {'a': 1} }} {{ 1 < 2 < 3 }} {{ 'x' == 'x' }}",
        "True True True True",
    ),
    "lipsum": ("{{ lipsum(2, false, 3, 4)|wordcount }}", "6"),
    "list": ("{{ name|list }} {{ range(3)|list }}", "['A', 'n', 'n'] [0, 1, 2]"),
}


@pytest.mark.parametrize(("source", "expected"), _NORMAL.values(), ids=_NORMAL.keys())
def test_normal_uses_of_the_limited_features_work(source: str, expected: str) -> None:
    assert render_template(source, {"name": "Ann"}, html=False) == expected


def test_html_escaping_still_applies_to_the_limited_features() -> None:
    source = (
        "{{ name|center(9) }}|{{ '%s' % name }}|{{ '<i>{}</i>'|safe ~ name }}|{{ [name]|join }}"
    )
    assert render_template(source, {"name": "<b>"}) == (
        "   &lt;b&gt;   |&lt;b&gt;|<i>{}</i>&lt;b&gt;|&lt;b&gt;"
    )


def test_a_long_order_table_fits_the_budget() -> None:
    source = (
        "<table>{% for item in items %}<tr class=\"{{ loop.cycle('odd', 'even') }}\">"
        "<td>{{ loop.index }}</td><td>{{ item.name|truncate(40) }}</td>"
        "<td>{{ '%5d'|format(item.qty) }}</td><td>{{ '{:,.2f}'.format(item.price) }}</td>"
        "{% if item.tags %}<td>{{ item.tags|join(', ') }}</td>{% endif %}</tr>{% endfor %}</table>"
    )
    items = [
        {"name": f"Widget {i}", "qty": i, "price": 9.5 + i, "tags": ["a"]} for i in range(2000)
    ]
    assert render_template(source, {"items": items}).count("<tr") == 2000
