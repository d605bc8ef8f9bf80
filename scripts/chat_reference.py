#!/usr/bin/env python3
"""Reference chat-template renders from Hugging Face transformers' own renderer.

Writes tests/data/chat/reference.json, which the Rust tests compare lorasft's minijinja renderer
against byte for byte. Needs only (no torch):

    pip install transformers==5.25.0 jinja2==3.1.6

and the assets of scripts/fetch-assets.sh. Usage:

    python3 scripts/chat_reference.py --assets .cache/assets --out tests/data/chat/reference.json

What is rendered:
  * every chat/templates/*.jinja (llama.cpp's models/templates) x every conversation of
    tests/data/chat/conversations.json x add_generation_prompt in (False, True), with
    bos_token "<s>" and eos_token "</s>";
  * the test cases of llama.cpp's tests/test-chat-template.cpp (template text parsed out of the C++
    literals), on that file's conversation (plus a case's extra_conversation), with
    add_generation_prompt=True and the case's own bos/eos tokens.

How (the same path as PreTrainedTokenizerBase.apply_chat_template with tokenize=False):
  messages go through transformers.utils.chat_template_utils._normalize_chat_messages (which drops
  keys whose value is None, e.g. `content: null`), then render_jinja_template(conversations=[msgs],
  tools=tools or None, chat_template=..., add_generation_prompt=..., bos_token=..., eos_token=...).
  strftime_now is made deterministic: transformers' `datetime` is patched so now() is the fixed
  2024-07-26 00:00:00. A render that raises is recorded as {"error": "<ExceptionType>: message"}.
"""
import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import sys

TRANSFORMERS_VERSION = "5.25.0"
JINJA2_VERSION = "3.1.6"
FIXED_NOW = _dt.datetime(2024, 7, 26, 0, 0, 0)
BOS, EOS = "<s>", "</s>"


def check_versions():
    try:
        import jinja2
        import transformers
    except ImportError as e:
        sys.exit(f"{e}; pip install transformers=={TRANSFORMERS_VERSION} jinja2=={JINJA2_VERSION}")

    bad = []
    if transformers.__version__ != TRANSFORMERS_VERSION:
        bad.append(f"transformers {transformers.__version__} (need {TRANSFORMERS_VERSION})")
    if jinja2.__version__ != JINJA2_VERSION:
        bad.append(f"jinja2 {jinja2.__version__} (need {JINJA2_VERSION})")
    if bad:
        sys.exit(
            "refusing to run on " + ", ".join(bad)
            + f"; pip install transformers=={TRANSFORMERS_VERSION} jinja2=={JINJA2_VERSION}"
        )


def load_renderer():
    from transformers.utils import chat_template_utils as ctu

    class FixedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return FixedDatetime(2024, 7, 26, 0, 0, 0, tzinfo=tz)

    # strftime_now (defined inside ctu._cached_compile_jinja_template) calls the module's
    # `datetime.now()` at render time, so patching the module global is enough.
    assert ctu.datetime is _dt.datetime, "transformers no longer imports datetime the expected way"
    ctu.datetime = FixedDatetime

    def render(messages, tools, template, add_generation_prompt, bos_token, eos_token):
        try:
            msgs = ctu._normalize_chat_messages(messages)
            rendered, _ = ctu.render_jinja_template(
                conversations=[msgs],
                tools=tools,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
            return {"output": rendered[0]}
        except Exception as e:  # noqa: BLE001 - every failure is data here
            return {"error": f"{type(e).__name__}: {e}"}

    probe = render([{"role": "user", "content": "x"}], None, "{{ strftime_now('%Y-%m-%d %H:%M:%S') }}",
                   False, BOS, EOS)
    assert probe == {"output": "2024-07-26 00:00:00"}, probe
    return render


# ---- C++ test-case extraction (tests/test-chat-template.cpp) ----------------------------------

_SIMPLE_ESC = {"n": 10, "t": 9, "r": 13, "\\": 92, '"': 34, "'": 39, "?": 63,
               "a": 7, "b": 8, "f": 12, "v": 11}


def _decode_cpp_string(body):
    """Decodes the body of a narrow (plain or u8) C++ string literal to str, escapes included."""
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        e = body[i + 1]
        if e in _SIMPLE_ESC:
            out.append(_SIMPLE_ESC[e])
            i += 2
        elif e in "01234567":
            m = re.match(r"[0-7]{1,3}", body[i + 1:])
            out.append(int(m.group(0), 8))
            i += 1 + len(m.group(0))
        elif e == "x":
            m = re.match(r"[0-9a-fA-F]+", body[i + 2:])
            out.append(int(m.group(0), 16))
            i += 2 + len(m.group(0))
        elif e in "uU":
            n = 4 if e == "u" else 8
            out += chr(int(body[i + 2:i + 2 + n], 16)).encode("utf-8")
            i += 2 + n
        else:
            raise ValueError(f"unknown C++ escape \\{e}")
    return out.decode("utf-8")


def _cpp_tokens(src):
    """Yields ('str', value) / ('punct', ch) / ('ident', name) / ('comment', text) tokens."""
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            yield ("comment", src[i + 2:j if j >= 0 else n].strip())
            i = n if j < 0 else j + 1
        elif src.startswith("/*", i):
            j = src.index("*/", i + 2)
            yield ("comment", src[i + 2:j].strip())
            i = j + 2
        elif (m := re.compile(r'(u8|u|U|L)?R"([^()\\ ]{0,16})\(').match(src, i)):
            if m.group(1) not in (None, "u8"):
                raise ValueError("only narrow string literals are supported")
            end = ")" + m.group(2) + '"'
            j = src.index(end, m.end())
            yield ("str", src[m.end():j])
            i = j + len(end)
        elif (m := re.compile(r'(u8|u|U|L)?"').match(src, i)):
            if m.group(1) not in (None, "u8"):
                raise ValueError("only narrow string literals are supported")
            j = m.end()
            while src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            yield ("str", _decode_cpp_string(src[m.end():j]))
            i = j + 1
        elif c.isalpha() or c == "_":
            m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(src, i)
            yield ("ident", m.group(0))
            i = m.end()
        elif c in "{}(),;":
            yield ("punct", c)
            i += 1
        else:
            raise ValueError(f"unexpected character {c!r} in test case list")


def _parse_init_list(toks, pos):
    """Parses `{ value, value, ... }` at toks[pos]; returns ([(designator, value)], next pos), where
    designator is the field a /* .field= */ comment names (or None). A value is a str (adjacent
    literals concatenated, U8C(...) unwrapped), a bool, or a nested list of such pairs."""
    assert toks[pos] == ("punct", "{"), toks[pos]
    pos += 1
    items, designator = [], None
    while True:
        kind, val = toks[pos]
        if kind == "comment":
            m = re.fullmatch(r"\.(\w+)\s*=?", val)
            designator = m.group(1) if m else designator
            pos += 1
        elif (kind, val) == ("punct", "}"):
            return items, pos + 1
        elif (kind, val) == ("punct", ","):
            pos += 1
        elif (kind, val) == ("punct", "{"):
            sub, pos = _parse_init_list(toks, pos)
            items.append((designator, sub))
            designator = None
        elif kind == "str" or (kind == "ident" and val == "U8C"):
            wrapped = kind == "ident"
            if wrapped:
                assert toks[pos + 1] == ("punct", "("), toks[pos + 1]
                pos += 2
            s = ""
            while toks[pos][0] in ("str", "comment"):
                if toks[pos][0] == "str":
                    s += toks[pos][1]
                pos += 1
            if wrapped:
                assert toks[pos] == ("punct", ")"), toks[pos]
                pos += 1
            items.append((designator, s))
            designator = None
        elif kind == "ident" and val in ("true", "false"):
            items.append((designator, val == "true"))
            designator = None
            pos += 1
        else:
            raise ValueError(f"unexpected token {(kind, val)!r}")


def _messages(pairs):
    """[(None, [(None, role), (None, content)]), ...] -> [{"role", "content"}, ...]"""
    out = []
    for _, msg in pairs:
        (_, role), (_, content) = msg
        out.append({"role": role, "content": content})
    return out


def parse_cpp_cases(path):
    """Returns (conversation, cases) of llama.cpp's main_automated_tests: each case a dict of the
    TestCase struct's fields (defaults filled in), extra_conversation as a list of messages."""
    src = open(path, encoding="utf-8", newline="").read()
    main = src[src.index("int main_automated_tests(void)"):]

    # The conversation every case is rendered on.
    conv_src = main[main.index("std::vector<llama_chat_message> conversation"):]
    conv_src = conv_src[conv_src.index("{"):]
    conv, _ = _parse_init_list(list(_cpp_tokens(conv_src[:_matching_brace(conv_src) + 1])), 0)
    conversation = _messages(conv)

    # struct TestCase's fields, in declaration order, and their defaults.
    struct = main[main.index("struct TestCase {") + len("struct TestCase "):]
    struct = struct[1:_matching_brace(struct)]
    fields, defaults = [], {}
    for decl in struct.split(";"):
        m = re.search(r"(\w+)\s*(?:=\s*(.+))?$", decl.strip(), re.S)
        if not m:
            continue
        fields.append(m.group(1))
        d = (m.group(2) or "").strip()
        if d in ("true", "false"):
            defaults[m.group(1)] = d == "true"
        elif d == "{}":
            defaults[m.group(1)] = []
        elif d.startswith('"'):
            defaults[m.group(1)] = _decode_cpp_string(d[1:-1])
    assert fields == ["name", "template_str", "expected_output", "expected_output_jinja", "bos_token",
                      "eos_token", "supported_with_jinja", "extra_conversation"], fields

    body = main[main.index("std::vector<TestCase> test_cases"):]
    body = body[body.index("{"):]
    toks = list(_cpp_tokens(body[:_matching_brace(body) + 1]))
    items, end = _parse_init_list(toks, 0)
    assert end == len(toks), "trailing tokens after the test case list"

    cases = []
    for _, item in items:
        case = dict(defaults)
        for idx, (designator, value) in enumerate(item):
            # Positional initialisation; a /* .field= */ comment, where present, must agree.
            assert designator in (None, fields[idx]), (designator, fields[idx], item[0])
            case[fields[idx]] = _messages(value) if fields[idx] == "extra_conversation" else value
        cases.append(case)
    return conversation, cases


def _matching_brace(s):
    depth = 0
    for tok_start, (kind, val) in _tokens_with_offsets(s):
        if (kind, val) == ("punct", "{"):
            depth += 1
        elif (kind, val) == ("punct", "}"):
            depth -= 1
            if depth == 0:
                return tok_start
    raise ValueError("unbalanced braces")


def _tokens_with_offsets(s):
    # Minimal re-scan giving offsets for braces outside strings/comments.
    i, n = 0, len(s)
    while i < n:
        if s.startswith("//", i):
            j = s.find("\n", i)
            i = n if j < 0 else j + 1
        elif s.startswith("/*", i):
            i = s.index("*/", i + 2) + 2
        elif (m := re.compile(r'(u8|u|U|L)?R"([^()\\ ]{0,16})\(').match(s, i)):
            i = s.index(")" + m.group(2) + '"', m.end()) + len(m.group(2)) + 2
        elif s[i] == '"':
            j = i + 1
            while s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            i = j + 1
        elif s[i] == "'":
            j = i + 1
            while s[j] != "'":
                j += 2 if s[j] == "\\" else 1
            i = j + 1
        else:
            if s[i] in "{}":
                yield i, ("punct", s[i])
            i += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=".cache/assets", help="scripts/fetch-assets.sh's directory")
    ap.add_argument("--conversations", default=None,
                    help="default: tests/data/chat/conversations.json next to this script's repository")
    ap.add_argument("--out", default="tests/data/chat/reference.json")
    args = ap.parse_args()

    check_versions()
    render = load_renderer()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    conv_path = args.conversations or os.path.join(root, "tests/data/chat/conversations.json")
    with open(conv_path, encoding="utf-8") as f:
        conversations = json.load(f)

    tdir = os.path.join(args.assets, "chat/templates")
    templates = []
    n_ok = n_err = 0
    for name in sorted(f for f in os.listdir(tdir) if f.endswith(".jinja")):
        raw = open(os.path.join(tdir, name), "rb").read()
        text = raw.decode("utf-8")  # no newline translation: the template text is byte-exact
        cases = []
        for conv in conversations:
            for agp in (False, True):
                r = render(conv["messages"], conv.get("tools"), text, agp, BOS, EOS)
                n_ok += "output" in r
                n_err += "error" in r
                cases.append({"conversation": conv["id"], "add_generation_prompt": agp, **r})
        templates.append({"file": name, "sha256": hashlib.sha256(raw).hexdigest(), "cases": cases})

    cpp_conv, cpp_cases_raw = parse_cpp_cases(os.path.join(args.assets, "chat/test-chat-template.cpp"))
    expected_conv = [("system", "You are a helpful assistant"), ("user", "Hello"), ("assistant", "Hi there"),
                     ("user", "Who are you"), ("assistant", "   I am an assistant   "),
                     ("user", "Another question")]
    assert [(m["role"], m["content"]) for m in cpp_conv] == expected_conv, cpp_conv
    cpp_cases = []
    for c in cpp_cases_raw:
        messages = cpp_conv + c["extra_conversation"]
        r = render(messages, None, c["template_str"], True, c["bos_token"], c["eos_token"])
        out = {"name": c["name"], "template": c["template_str"], "bos_token": c["bos_token"],
               "eos_token": c["eos_token"], "add_generation_prompt": True}
        if c["extra_conversation"]:
            out["messages"] = messages
        out.update(r)
        # What llama.cpp's own jinja engine is expected to give (informational; not transformers').
        out["llama_cpp_expected"] = c["expected_output_jinja"] or c["expected_output"]
        out["llama_cpp_supported_with_jinja"] = c["supported_with_jinja"]
        cpp_cases.append(out)

    doc = {
        "generator": "scripts/chat_reference.py",
        "transformers": TRANSFORMERS_VERSION,
        "jinja2": JINJA2_VERSION,
        "renderer": "transformers.utils.chat_template_utils.render_jinja_template after _normalize_chat_messages",
        "now": FIXED_NOW.isoformat(),
        "bos_token": BOS,
        "eos_token": EOS,
        "cpp_conversation": cpp_conv,
        "templates": templates,
        "cpp_cases": cpp_cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        f.write(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    cpp_err = sum("error" in c for c in cpp_cases)
    print(f"templates: {len(templates)} x {2 * len(conversations)} cases: {n_ok} rendered, {n_err} raised")
    print(f"cpp cases: {len(cpp_cases)}: {len(cpp_cases) - cpp_err} rendered, {cpp_err} raised")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
